"""The sampling loop over diffusers' SVD components, as named stages that can each be timed:
preprocess -> encode -> denoise -> decode (load and write live with the caller).

Shapes: B videos, F frames, C=4 latent channels, h x w latent size (pixels / vae_scale).
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from animate_cli.errors import AnimateError
from animate_cli.models import Model
from animate_cli.sampling import SAMPLERS, SCHEDULES, nested_karras_sigmas, svd_preconditioning
from animate_cli.student import is_student, make_student_denoiser
from animate_cli.timing import StageTimer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """Everything one run needs, resolved from the preset, the command line and the model."""

    width: int
    height: int
    frames: int
    steps: int
    fps: int
    motion: int
    noise_aug: float
    min_guidance: float
    max_guidance: float
    decode_chunk: int
    sampler: str
    schedule: str
    sigmas: tuple[float, ...] | None = None  # an explicit grid (steps + 1 values, the last 0): overrides schedule


@dataclass
class Conditioning:
    """Computed once per video, reused at every step."""

    image_embeds: torch.Tensor  # [B, 1, D] CLIP image embedding
    image_latents: torch.Tensor  # [B, C, h, w] VAE latent of the (noise-augmented) image
    added_time_ids: torch.Tensor  # [B, 3]: fps - 1, motion bucket, noise augmentation


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per video, as `torch.Generator(device).manual_seed(seed)` in diffusers."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def randn(shape, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Noise [B, *shape], video i drawn from generators[i] alone: a video's noise does not depend on its batch."""
    return torch.cat([torch.randn((1, *shape), generator=g, device=device, dtype=dtype) for g in generators])


# 1. Preprocess: PIL images (already at the output size) -> tensors
def preprocess(model: Model, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [B, 3, H, W] in [-1, 1] for the VAE, clip_pixels [B, 3, S, S] normalised for CLIP)."""
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))) for im in images]).permute(0, 3, 1, 2)
    pixels = pixels.to(model.device, torch.float32) / 255.0 * 2.0 - 1.0
    fe = model.feature_extractor
    side = fe.crop_size["height"]
    # SVD's own CLIP preprocessing: antialiased resize in [-1, 1], then CLIP's mean/std.
    clip = (resize_antialiased(pixels, (side, side)) + 1.0) / 2.0
    mean = torch.tensor(fe.image_mean, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(fe.image_std, device=clip.device).view(1, 3, 1, 1)
    return pixels, (clip - mean) / std


def resize_antialiased(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The resize SVD was trained with (diffusers' helper, a port of the reference implementation)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # importing the pipeline module warns about torchvision, which we do not use
    try:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )
    finally:
        logging.set_verbosity(verbosity)

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return _resize_with_antialiasing(x, size)


# 2. Encode: CLIP image embedding and VAE latent of the conditioning image
def encode(model: Model, pixels, clip_pixels, settings: Settings, generators) -> Conditioning:
    dtype, device = model.dtype, model.device
    image_embeds = model.image_encoder(clip_pixels.to(dtype)).image_embeds.unsqueeze(1)
    noise = randn(pixels.shape[1:], generators, device, torch.float32)
    augmented = pixels + settings.noise_aug * noise
    image_latents = model.vae.encode(augmented.to(model.vae.dtype)).latent_dist.mode().to(dtype)
    # SVD was conditioned on fps - 1
    ids = torch.tensor([settings.fps - 1, settings.motion, settings.noise_aug], dtype=dtype, device=device)
    return Conditioning(image_embeds, image_latents, ids.expand(len(generators), 3))


def guidance_scales(settings: Settings, device) -> torch.Tensor:
    """[1, F, 1, 1, 1]: SVD's scale rising linearly from the first frame to the last."""
    scales = torch.linspace(settings.min_guidance, settings.max_guidance, settings.frames)
    return scales.to(device).view(1, -1, 1, 1, 1)


def uses_guidance(settings: Settings) -> bool:
    return max(settings.min_guidance, settings.max_guidance) > 1.0


def make_denoiser(model: Model, cond: Conditioning, settings: Settings, timer: StageTimer | None = None):
    """The EDM denoiser D(x, sigma) -> x0 over SVD's v-prediction UNet, with classifier-free guidance
    as one UNet call on a batch of two halves (unconditional: zero embedding and zero image latent)."""
    frames, dtype = settings.frames, model.dtype
    guided = uses_guidance(settings)
    scales = guidance_scales(settings, model.device)
    latents = cond.image_latents.unsqueeze(1).expand(-1, frames, -1, -1, -1)  # [B, F, C, h, w]
    embeds, time_ids = cond.image_embeds, cond.added_time_ids
    if guided:
        latents = torch.cat([torch.zeros_like(latents), latents])
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        time_ids = torch.cat([time_ids, time_ids])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in, c_skip, c_out, c_noise = svd_preconditioning(sigma)
        x_in = (x * c_in).to(dtype)
        if guided:
            x_in = torch.cat([x_in, x_in])
        v = model.unet(torch.cat([x_in, latents], dim=2), c_noise.to(model.device), encoder_hidden_states=embeds,
                       added_time_ids=time_ids, return_dict=False)[0]
        if timer is not None:
            timer.unet_calls += 1
            timer.unet_passes += 2 if guided else 1  # one pass per guidance term, batched in one call
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + scales * (v_cond - v_uncond)
        return v.float() * c_out + x * c_skip

    return denoise


def denoiser_for(model: Model, cond: Conditioning, settings: Settings, timer: StageTimer | None = None):
    """A guidance-distilled student takes one pass per step; any other UNet, the guided two-pass denoiser."""
    if is_student(model.unet):
        return make_student_denoiser(model, cond, settings, timer)
    return make_denoiser(model, cond, settings, timer)


def sigma_schedule(model: Model, settings: Settings) -> torch.Tensor:
    """steps + 1 sigmas, the last 0. 'student': the grid the student was distilled on (student.json)."""
    config = model.scheduler_config
    if settings.sigmas is not None:
        if len(settings.sigmas) != settings.steps + 1 or settings.sigmas[-1] != 0:
            raise AnimateError(f"explicit sigmas: expected {settings.steps + 1} values ending in 0")
        return torch.tensor(settings.sigmas, dtype=torch.float32)
    if settings.schedule != "student":
        return SCHEDULES[settings.schedule](settings.steps, config["sigma_min"], config["sigma_max"])
    meta = model.extras.get("student")
    if meta is None:
        raise AnimateError("schedule 'student' needs a student: set the preset's student field")
    if "sigmas" not in meta:  # an untrained student: the grid `animate distill` would train it on
        return nested_karras_sigmas(settings.steps, config["sigma_min"], config["sigma_max"])
    if len(meta["sigmas"]) != settings.steps + 1:
        raise AnimateError(f"this student was distilled for {len(meta['sigmas']) - 1} steps, not {settings.steps}: "
                           f"use --steps {len(meta['sigmas']) - 1}")
    return torch.tensor(meta["sigmas"], dtype=torch.float32)


# 3. Denoise: noise -> latents
def denoise(model: Model, cond: Conditioning, settings: Settings, generators, timer: StageTimer | None = None,
            on_step=None) -> torch.Tensor:
    """Latents [B, F, C, h, w] in float32."""
    config = model.scheduler_config
    sigmas = sigma_schedule(model, settings).to(model.device)
    c = model.vae.config.latent_channels
    shape = (settings.frames, c, settings.height // model.vae_scale, settings.width // model.vae_scale)
    # Drawn in the model dtype, as diffusers does, so a seed gives the same noise in both.
    noise = randn(shape, generators, model.device, model.dtype).float()
    x = noise * init_noise_scale(config, sigmas[0].item())
    model_fn = denoiser_for(model, cond, settings, timer)
    clock = StepClock(timer, on_step)  # started here, so the first interval is the first step
    sampler = SAMPLERS[settings.sampler]
    if settings.sampler == "animatelcm":  # stochastic: fresh noise per step from each video's own generator
        sampler = functools.partial(sampler, generator=generators)
    x = sampler(model_fn, x, sigmas, callback=clock)
    clock.close()
    return x


def init_noise_scale(scheduler_config: dict, sigma_max: float) -> float:
    """diffusers' Euler scheduler scales the first noise by sqrt(sigma_max^2 + 1) for 'leading' and
    'linspace' spacing, and by sigma_max otherwise; matched so a seed gives the same video in both."""
    if scheduler_config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
        return sigma_max
    return math.sqrt(sigma_max**2 + 1)


class StepClock:
    """Sampler callback: marks each step's end on the timer (a CUDA event on a GPU: no synchronisation, so the
    next step is queued while this one runs) and reports progress."""

    def __init__(self, timer: StageTimer | None, on_step):
        self.timer, self.on_step = timer, on_step
        if timer is not None:
            timer.mark_step()

    def __call__(self, info: dict) -> None:
        if self.timer is not None:
            self.timer.mark_step()
        if self.on_step is not None:
            self.on_step(info["i"])

    def close(self) -> None:
        if self.timer is not None:
            self.timer.end_steps()


# 4. Decode: latents -> frames
def decode(model: Model, latents: torch.Tensor, chunk: int, sink=None) -> torch.Tensor:
    """uint8 frames [B, F, H, W, 3], each video decoded `chunk` frames per VAE call (a chunk never spans two
    videos: the temporal decoder mixes the frames of a call). With `sink`, each chunk of one video goes to
    sink(video index, uint8 numpy [f, H, W, 3]) as soon as it is decoded, so the caller can encode it while the
    next chunk decodes; the frames then come back on the CPU."""
    videos = []
    for b, video in enumerate(latents):
        flat = (video / model.vae.config.scaling_factor).to(model.vae.dtype)
        pieces = []
        for start in range(0, flat.shape[0], chunk):
            piece = flat[start : start + chunk]
            pixels = model.vae.decode(piece, num_frames=piece.shape[0]).sample.float()  # [f, 3, H, W] in [-1, 1]
            piece = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            if sink is not None:
                piece = piece.cpu()
                sink(b, piece.numpy())
            pieces.append(piece)
        videos.append(torch.cat(pieces))
    return torch.stack(videos)


def warm_up(model: Model, cond: Conditioning, settings: Settings, timer: StageTimer) -> None:
    """A compiled model's first call at new shapes compiles: do it here, timed as its own stage
    ('compile'), with one UNet pass and one full decode, so steady-state stages stay clean."""
    warm = model.extras.get("warm_shapes")
    key = (len(cond.image_embeds), settings.frames, settings.height, settings.width, settings.decode_chunk,
           uses_guidance(settings))
    if warm is None or key in warm:
        return
    with timer.stage("compile"):
        c = model.vae.config.latent_channels
        x = torch.zeros(len(cond.image_embeds), settings.frames, c, settings.height // model.vae_scale,
                        settings.width // model.vae_scale, device=model.device)
        sigma = torch.tensor(1.0, device=model.device)
        denoiser_for(model, cond, settings)(x, sigma)
        decode(model, x, settings.decode_chunk)
    warm.add(key)
    if model.extras.get("compiled") == "inductor":
        from animate_cli.optimize import save_compile_cache

        save_compile_cache(model.device)


def generate(model: Model, images: list[Image.Image], seeds: list[int], settings: Settings,
             timer: StageTimer, on_step=None, sink=None) -> torch.Tensor:
    """Images already at the output size -> uint8 frames [B, F, H, W, 3]; `sink`: see decode."""
    generators = make_generators(seeds, model.device)
    with torch.inference_mode():
        with timer.stage("preprocess"):
            pixels, clip_pixels = preprocess(model, images)
        with timer.stage("encode"):
            cond = encode(model, pixels, clip_pixels, settings, generators)
        warm_up(model, cond, settings, timer)
        with timer.stage("denoise"):
            latents = denoise(model, cond, settings, generators, timer, on_step)
        with timer.stage("decode"):
            return decode(model, latents, settings.decode_chunk, sink)

