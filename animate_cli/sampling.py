"""Samplers over an EDM denoiser `model(x, sigma) -> x0 estimate`, and their sigma schedules.

Each sampler: (model, x, sigmas, callback) -> x, with x starting as noise * sigmas[0] and sigmas ending in 0.
`callback({"i": step, "sigma": sigma, "denoised": x0})` follows progress.
"""

import math

import torch


def svd_preconditioning(sigma: torch.Tensor):
    """(c_in, c_skip, c_out, c_noise) of SVD's EDM v-prediction model (Karras et al. 2022, table 1; sigma_data = 1):
    the denoiser is D(x, sigma) = c_skip x + c_out v(c_in x, c_noise)."""
    s2 = sigma**2 + 1
    return 1 / s2.sqrt(), 1 / s2, -sigma / s2.sqrt(), 0.25 * sigma.log()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM), eq. 5: SVD's stock spacing. Float64 math, as diffusers does it."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def log_sigma_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Steps uniform in log sigma, which for EDM (alpha = 1) is uniform in log-SNR."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def nested_karras_sigmas(n: int, sigma_min: float, sigma_max: float, base: int = 32) -> torch.Tensor:
    """Karras at `base` steps taken every base/n points: progressive distillation's grids (32 -> 16 -> 8) nest."""
    if base % n:
        raise ValueError(f"{n} steps do not divide the {base}-step grid")
    return karras_sigmas(base, sigma_min, sigma_max)[:: base // n].clone()


SCHEDULES = {"karras": karras_sigmas, "log_sigma": log_sigma_sigmas}


@torch.no_grad()
def sample_euler(model, x, sigmas, callback=None):
    """Euler steps on the probability-flow ODE, Karras et al. 2022, alg. 1 (SVD's stock sampler)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), alg. 2, in t = -log sigma."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised  # last step: the data prediction itself
            break
        h = (sigmas[i].log() - sigmas[i + 1].log()).item()
        if old_denoised is None:
            d = denoised  # first step: DPM-Solver++(1), i.e. DDIM
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, callback=None):
    """Heun's second-order method, Karras et al. 2022, alg. 1 with S_churn = 0 (the accurate reference)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = (x_next - model(x_next, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_next) / 2 * dt
    return x


SAMPLERS = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m, "heun": sample_heun}


def animatelcm_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      train_steps: int = 40) -> torch.Tensor:
    """AnimateLCM-SVD's schedule (its consistency scheduler, 40 training points): Karras sigmas at the ramp
    positions k * (40 // n) / 39, k = 0 .. n-1, then 0. Unlike karras_sigmas it stops short of sigma_min
    (4 steps: ramp 0, 10/39, 20/39, 30/39)."""
    if not 1 <= n <= train_steps:
        raise ValueError(f"AnimateLCM schedule: 1 to {train_steps} steps, got {n}")
    ramp = torch.arange(n, dtype=torch.float64) * (train_steps // n) / (train_steps - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def consistency_noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like x (float32): from one generator, from one per video ([B, ...] with
    generators[i] drawing video i alone), or from torch's global generator when None."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=torch.float32)
                          for g in generator]).to(x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


@torch.no_grad()
def sample_animatelcm(model, x, sigmas, callback=None, generator=None, s_noise: float = 1.0):
    """Multistep consistency sampling (Song et al. 2023, alg. 1) as AnimateLCM-SVD's stochastic iterative
    scheduler does it: the consistency model's estimate x0 = model(x, sigma) at each sigma; before every step
    but the last, fresh noise at the next level, x = x0 + s_noise * sigma_next * z, z ~ N(0, I) (the scheduler's
    sigma_data = 1 and clip_denoised = False; its next sigma is clamped to [0, sigma_max], a no-op on a
    decreasing schedule). The last step returns x0 itself. `generator`: a torch.Generator, or one per video."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "denoised": denoised})
        sigma_next = sigmas[i + 1]
        if sigma_next == 0:
            x = denoised
            break
        x = denoised + s_noise * sigma_next * consistency_noise(denoised, generator)
    return x


SAMPLERS["animatelcm"] = sample_animatelcm
SCHEDULES["animatelcm"] = animatelcm_sigmas
