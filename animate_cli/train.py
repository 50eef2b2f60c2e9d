"""Training of the tiny-motion model on procedural clips (animate_cli.clips), with the project's own code.

Three phases in one resumable run:
1. VAE (AutoencoderKLTemporalDecoder): reconstruction (MSE + L1) of clips, decoded as videos from the posterior's
   mode plus a little noise, plus a small KL (which keeps the latents near unit scale).
   At the end its latents' scaling factor is measured (1 / std) and stored in its config.
2. UNet (UNetSpatioTemporalConditionModel) and CLIP image encoder, jointly, with SVD's objective: EDM
   (Karras et al. 2022) over v-prediction, log sigma ~ N(p_mean, p_std), loss = unweighted v error
   (= x0 error weighted (sigma^2 + 1) / sigma^2), conditioning as the pipeline gives it at inference
   (animate_cli.pipeline: first-frame latent of the noise-augmented image on the channels of every frame,
   CLIP image embedding [B, 1, D], added_time_ids [fps - 1, motion bucket, noise_aug]), both conditionings
   zeroed together with probability `cond_drop`, so classifier-free guidance works. The VAE is frozen.
3. (optional, `decoder_steps`) the VAE decoder alone, encoder frozen: sharper frames from the same latents.

The CLIP vision encoder is randomly initialised and trained jointly with the UNet (it is small: 32x32
input, 8x8 patches). An EMA of the UNet and CLIP weights is what gets exported.

A run is a pure function of its config and seed: every step's clips, noise and sigmas are drawn from
generators seeded by (seed, step), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from animate_cli import clips
from animate_cli.checkpoint import load_checkpoint_file, save_checkpoint_file
from animate_cli.sampling import svd_preconditioning

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FPS = 7  # the presets' fps: the clips have no real frame rate, so the model is trained at the one it is run at

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}


@dataclass
class TrainConfig:
    size: int = 32  # frame side, pixels
    frames: int = 8
    seed: int = 0
    # architecture
    # Channels: every diffusers GroupNorm has 32 groups, and one channel per group (32 channels) is a per-channel
    # instance norm that erases absolute levels (colours!) before the VAE's and the UNet's output convolutions:
    # the outer stages (first and last of the VAE, first of the UNet) get 64 (two channels per group).
    vae_channels: tuple[int, ...] = (64, 32, 64)  # 3 levels: latent scale 4 (32x32 px -> 8x8 latents)
    latent_channels: int = 8  # 8x8x8 latents for 32x32x3 pixels: 6x compression (SD's 4 channels: 12x, too blurry)
    unet_channels: tuple[int, ...] = (64, 64)
    unet_heads: tuple[int, ...] = (2, 2)
    time_embed_dim: int = 16
    clip_hidden: int = 64
    clip_layers: int = 2
    clip_patch: int = 8
    # VAE phase
    vae_steps: int = 400
    vae_batch: int = 3  # clips (x frames)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against the per-pixel reconstruction loss
    latent_noise: float = 0.05
    # UNet phase
    unet_steps: int = 3000
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 100
    p_mean: float = -0.4
    p_std: float = 1.6
    cond_drop: float = 0.1
    noise_aug_max: float = 0.1
    motion_range: tuple[int, int] = (48, 208)
    ema: float = 0.998
    decay: float = 0.25  # the last quarter of the UNet steps: learning rate down linearly to a tenth
    # decoder phase: the VAE decoder alone, encoder frozen (latents unchanged, so the UNet stays valid)
    decoder_steps: int = 0
    decoder_lr: float = 5e-4

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.unet_steps + self.decoder_steps

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**d)


def micro_config(**changes) -> TrainConfig:
    """A very small model for tests: seconds per hundred steps."""
    base = dict(size=16, frames=4, vae_channels=(32, 32), latent_channels=4, unet_channels=(32, 32), unet_heads=(1, 1),
                time_embed_dim=8, clip_hidden=16, clip_layers=1, clip_patch=8, vae_steps=5, vae_batch=2,
                unet_steps=10, batch=2, warmup=0)
    return TrainConfig(**{**base, **changes})


# ---------------------------------------------------------------- architecture
def vae_config(c: TrainConfig) -> dict:
    n = len(c.vae_channels)
    return {
        "block_out_channels": list(c.vae_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": c.latent_channels,
        "layers_per_block": 1,
        "out_channels": 3,
        "sample_size": c.size,
        "scaling_factor": 1.0,
    }


def unet_config(c: TrainConfig) -> dict:
    n = len(c.unet_channels)
    return {
        "addition_time_embed_dim": c.time_embed_dim,
        "block_out_channels": list(c.unet_channels),
        "cross_attention_dim": c.clip_hidden,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * n,
        "in_channels": 2 * c.latent_channels,
        "layers_per_block": 1,
        "num_attention_heads": list(c.unet_heads),
        "num_frames": c.frames,
        "out_channels": c.latent_channels,
        "projection_class_embeddings_input_dim": 3 * c.time_embed_dim,
        "sample_size": c.size // 2 ** (len(c.vae_channels) - 1),
        "transformer_layers_per_block": 1,
        "up_block_types": ["CrossAttnUpBlockSpatioTemporal"] * n,
    }


def clip_config(c: TrainConfig) -> dict:
    return dict(hidden_size=c.clip_hidden, intermediate_size=2 * c.clip_hidden, num_hidden_layers=c.clip_layers,
                num_attention_heads=4 if c.clip_hidden % 4 == 0 else 1, image_size=c.size, patch_size=c.clip_patch,
                projection_dim=c.clip_hidden, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)


def feature_extractor_config(c: TrainConfig) -> dict:
    return {
        "crop_size": {"height": c.size, "width": c.size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": c.size},
    }


def build(c: TrainConfig, seed: int | None = None):
    """(vae, unet, image_encoder), freshly initialised from `seed` (the run's seed by default), float32."""
    torch.manual_seed(c.seed if seed is None else seed)
    vae = AutoencoderKLTemporalDecoder.from_config(vae_config(c))
    unet = UNetSpatioTemporalConditionModel.from_config(unet_config(c))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config(c)))
    return vae, unet, image_encoder


# ---------------------------------------------------------------- state
@dataclass
class State:
    config: TrainConfig
    vae: torch.nn.Module
    unet: torch.nn.Module
    image_encoder: torch.nn.Module
    ema_unet: torch.nn.Module
    ema_encoder: torch.nn.Module
    vae_opt: torch.optim.Optimizer
    opt: torch.optim.Optimizer
    step: int = 0  # total steps done: VAE steps first, then UNet steps
    history: list = field(default_factory=list)  # [step, phase, loss] every logged step

    @property
    def phase(self) -> str:
        if self.step < self.config.vae_steps:
            return "vae"
        if self.step < self.config.vae_steps + self.config.unet_steps:
            return "unet"
        return "decoder" if self.step < self.config.total_steps else "done"


def new_state(c: TrainConfig) -> State:
    vae, unet, enc = build(c)
    return State(config=c, vae=vae, unet=unet, image_encoder=enc, ema_unet=copy.deepcopy(unet).requires_grad_(False),
                 ema_encoder=copy.deepcopy(enc).requires_grad_(False),
                 vae_opt=torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, weight_decay=0.0),
                 opt=torch.optim.AdamW([*unet.parameters(), *enc.parameters()], lr=c.lr, weight_decay=0.0))


def save_checkpoint(state: State, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "config": asdict(state.config),
        "step": state.step,
        "history": state.history,
        "vae_scaling_factor": state.vae.config.scaling_factor,
        **{name: getattr(state, name).state_dict() for name in
           ("vae", "unet", "image_encoder", "ema_unet", "ema_encoder", "vae_opt", "opt")},
    }
    save_checkpoint_file(path, data)  # atomic: a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path) -> State:
    data = load_checkpoint_file(path)
    state = new_state(TrainConfig.from_dict(data["config"]))
    for name in ("vae", "unet", "image_encoder", "ema_unet", "ema_encoder", "vae_opt", "opt"):
        getattr(state, name).load_state_dict(data[name])
    state.vae.register_to_config(scaling_factor=data["vae_scaling_factor"])
    state.step, state.history = data["step"], data["history"]
    return state


# ---------------------------------------------------------------- steps
def to_pixels(batch: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def clip_inputs(first: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP's normalised input (the pipeline's preprocess; no resize at native size)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((first + 1) / 2 - mean) / std


def step_generator(c: TrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(c.seed * 1_000_003 + step)


def cosine(lr: float, k: int, steps: int) -> float:
    """From lr down to a tenth of it over `steps`."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1))))


def vae_step(state: State, decoder_only: bool = False) -> float:
    c = state.config
    batch, _ = clips.training_batch(state.step, c.vae_batch, c.frames, c.size, c.seed, c.motion_range)
    pixels = to_pixels(batch).flatten(0, 1)  # [B*F, 3, H, W]
    g = step_generator(c, state.step)
    state.vae.train()
    if decoder_only:
        lr = cosine(c.decoder_lr, state.step - c.vae_steps - c.unet_steps, c.decoder_steps)
    else:
        lr = cosine(c.vae_lr, state.step, c.vae_steps)
    for group in state.vae_opt.param_groups:
        group["lr"] = lr
    with torch.set_grad_enabled(not decoder_only):
        posterior = state.vae.encode(pixels).latent_dist
    # Decoded from the mode (as the pipeline uses it) plus a little noise, so the decoder tolerates the
    # diffusion's small errors; sampling at the posterior's initial std (~1) stalls a VAE this small.
    z = posterior.mode() + c.latent_noise * torch.randn(posterior.mean.shape, generator=g)
    recon = state.vae.decode(z, num_frames=c.frames).sample
    loss = F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels)
    if not decoder_only:
        loss = loss + c.kl_weight * posterior.kl().mean() / z[0].numel()
    state.vae_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.vae.parameters(), 1.0)
    state.vae_opt.step()
    return loss.item()


@torch.no_grad()
def measure_scaling_factor(state: State, batches: int = 8) -> float:
    c = state.config
    state.vae.eval()
    zs = []
    for i in range(batches):
        batch, _ = clips.training_batch(10**6 + i, c.vae_batch, c.frames, c.size, c.seed + 1)
        zs.append(state.vae.encode(to_pixels(batch).flatten(0, 1)).latent_dist.mode())
    return float(1.0 / torch.cat(zs).std())


def unet_loss(c: TrainConfig, vae, unet, image_encoder, batch: np.ndarray, motions: np.ndarray,
              g: torch.Generator) -> torch.Tensor:
    """SVD's EDM v-prediction loss for one batch of clips, conditioned as animate_cli.pipeline conditions."""
    b = batch.shape[0]
    pixels = to_pixels(batch)  # [B, F, 3, H, W]
    sf = vae.config.scaling_factor
    with torch.no_grad():
        x0 = vae.encode(pixels.flatten(0, 1)).latent_dist.mode() * sf
        x0 = x0.view(b, c.frames, *x0.shape[1:])  # [B, F, 4, h, w]
        first = pixels[:, 0]
        noise_aug = torch.rand(b, generator=g) * c.noise_aug_max
        augmented = first + noise_aug.view(b, 1, 1, 1) * torch.randn(first.shape, generator=g)
        image_latents = vae.encode(augmented).latent_dist.mode()  # unscaled, as SVD
    embeds = image_encoder(clip_inputs(first)).image_embeds.unsqueeze(1)  # [B, 1, D]
    keep = (torch.rand(b, generator=g) >= c.cond_drop).float()
    embeds = embeds * keep.view(b, 1, 1)
    image_latents = image_latents * keep.view(b, 1, 1, 1)
    time_ids = torch.stack([torch.full((b,), FPS - 1.0), torch.from_numpy(motions).float(), noise_aug], dim=1)

    sigma = (c.p_mean + c.p_std * torch.randn(b, generator=g)).exp().view(b, 1, 1, 1, 1)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=g)
    c_in, c_skip, c_out, _ = svd_preconditioning(sigma)
    unet_in = torch.cat([noisy * c_in, image_latents.unsqueeze(1).expand(-1, c.frames, -1, -1, -1)], dim=2)
    v = unet(unet_in, 0.25 * sigma.flatten().log(), encoder_hidden_states=embeds, added_time_ids=time_ids,
             return_dict=False)[0]
    target = (x0 - c_skip * noisy) / c_out  # the v for which c_skip x + c_out v = x0
    return F.mse_loss(v, target)


def unet_step(state: State) -> float:
    c = state.config
    k = state.step - c.vae_steps
    batch, motions = clips.training_batch(state.step, c.batch, c.frames, c.size, c.seed, c.motion_range)
    g = step_generator(c, state.step)
    state.vae.eval()
    state.unet.train()
    state.image_encoder.train()
    lr = c.lr * min(1.0, (k + 1) / max(c.warmup, 1))
    decay_from = int(c.unet_steps * (1 - c.decay))  # then linearly down to a tenth over the last `decay` part
    if k >= decay_from:
        lr *= 1 - 0.9 * (k - decay_from) / max(c.unet_steps - decay_from, 1)
    for group in state.opt.param_groups:
        group["lr"] = lr
    loss = unet_loss(c, state.vae, state.unet, state.image_encoder, batch, motions, g)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [*state.unet.parameters(), *state.image_encoder.parameters()]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    state.opt.step()
    decay = min(c.ema, (1 + k) / (10 + k))
    with torch.no_grad():
        for ema, live in ((state.ema_unet, state.unet), (state.ema_encoder, state.image_encoder)):
            for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                pe.lerp_(pl, 1 - decay)
    return loss.item()


def train(state: State, checkpoint: Path | None = None, until: int | None = None, minutes: float | None = None,
          checkpoint_every: int = 200, log_every: int = 20, log=print) -> State:
    """Run steps until `until` (default: the end of both phases) or `minutes` of wall time; checkpoints
    every `checkpoint_every` steps, at the end of the VAE phase, and at the end."""
    c = state.config
    total = c.total_steps
    until = total if until is None else min(until, total)
    start, start_step = time.perf_counter(), state.step
    recent: list[float] = []
    while state.step < until:
        phase = state.phase
        loss = unet_step(state) if phase == "unet" else vae_step(state, decoder_only=phase == "decoder")
        recent.append(loss)
        state.step += 1
        if phase == "vae" and state.step == c.vae_steps:
            sf = measure_scaling_factor(state)
            state.vae.register_to_config(scaling_factor=sf)
            log(f"vae done: latent scaling factor {sf:.4f}")
        if state.step % log_every == 0 or state.step == until:
            mean = sum(recent) / len(recent)
            state.history.append([state.step, phase, mean])
            elapsed = time.perf_counter() - start
            rate = (state.step - start_step) / max(elapsed, 1e-9)
            eta = (until - state.step) / max(rate, 1e-9)
            log(f"step {state.step}/{until} [{phase}] loss {mean:.4f}  {rate:.2f} it/s  "
                f"elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min")
            recent = []
        boundary = state.step == c.vae_steps
        if checkpoint is not None and (state.step % checkpoint_every == 0 or boundary):
            save_checkpoint(state, checkpoint)
        if minutes is not None and time.perf_counter() - start > minutes * 60:
            log(f"time limit of {minutes} min reached at step {state.step}")
            break
    if checkpoint is not None:
        save_checkpoint(state, checkpoint)
    return state


def take_decoder(state: State, other: State) -> None:
    """Use `other`'s VAE decoder in `state` (a decoder phase run separately from the same VAE checkpoint)."""
    mine, theirs = state.vae.state_dict(), other.vae.state_dict()
    encoder = [k for k in mine if k.startswith(("encoder.", "quant_conv."))]
    if any(not torch.equal(mine[k], theirs[k]) for k in encoder):
        raise ValueError("the two checkpoints' VAE encoders differ: their latents would not match")
    state.vae.load_state_dict(theirs)


# ---------------------------------------------------------------- export
def export(state: State, folder: Path, dtype: torch.dtype = torch.float16, heldout_seed: int = 0,
           notes: dict | None = None) -> Path:
    """The EMA weights as a diffusers-layout folder that animate_cli.models.load_model reads (safetensors)."""
    from diffusers import EulerDiscreteScheduler

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    c = state.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", state.vae), ("unet", state.ema_unet), ("image_encoder", state.ema_encoder)):
        copy.deepcopy(module).to(dtype).save_pretrained(folder / name, safe_serialization=True)
    CLIPImageProcessor(**feature_extractor_config(c)).save_pretrained(folder / "feature_extractor")
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableVideoDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = {
        "native_size": [c.size, c.size],
        "frames": c.frames,
        "heldout": {"generator": "animate_cli.clips", "stream": clips.HELDOUT, "seed": heldout_seed,
                    "size": c.size, "frames": c.frames, "motion": clips.DEFAULT_MOTION, "fps": FPS},
        "training": {"config": asdict(c), "steps": state.step,
                     "final_loss": state.history[-1][2] if state.history else None, **(notes or {})},
    }
    (folder / "animate.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seconds_per_step(state: State, phase: str, n: int = 3) -> float:
    """Measured cost of one step of `phase` (the state's weights change; for planning only)."""
    fn = vae_step if phase == "vae" else unet_step
    step = state.step
    state.step = 0 if phase == "vae" else state.config.vae_steps
    try:
        fn(state)
        t = time.perf_counter()
        for _ in range(n):
            fn(state)
        return (time.perf_counter() - t) / n
    finally:
        state.step = step


__all__ = ["TrainConfig", "State", "new_state", "load_checkpoint", "save_checkpoint", "train", "export",
           "micro_config"]
