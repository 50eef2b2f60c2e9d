"""Guidance and step distillation of SVD into a one-pass, few-step student (Meng et al. 2023, "On Distillation of
Guided Diffusion Models"; the step part is Salimans & Ho 2022, "Progressive Distillation").

Phases, one resumable run (WORKDIR/checkpoint.safetensors):
  phase 0, stage 1 (guidance): the student (animate_cli.student: the teacher's UNet plus a zero-initialised
      guidance embedding of the video's w, or optionally of each frame's scale) learns, in ONE pass, the
      teacher's classifier-free-guided output (two passes, uncond + cond, combined with SVD's per-frame scales
      rising linearly from min_guidance on the first frame to w = max_guidance on the last), w ~ U(guidance_range)
      per video, at sigmas of the BASE grid (final_steps * step_factor**rounds steps, e.g. 32), drawn most often
      where the student's errors move the final video most (sigma_sampling = "lognormal", see sigma_probabilities) or
      evenly ("uniform").
  phase r = 1..rounds, stage 2 (progressive step distillation): the student on a grid of 1/step_factor the steps learns
      to land, with one DDIM step (= Euler on the EDM probability-flow ODE: x' = x0 + (s'/s) (x - x0)), where
      step_factor (by default two) DDIM steps of the previous phase's student (frozen, loaded from
      WORKDIR/phase-{r-1}) land: the target x0 is (z'' - (s_next/s) z) / (1 - s_next/s)  (z'' when s_next = 0).
      32 -> 16 -> 8 steps with rounds = 2.
      Their sigmas come evenly from their own grids (round_sigma_sampling = "uniform"), or as stage 1 draws.
      With rounds = 1, step_factor = 4, one round goes 32 -> 8. round_target = "teacher" takes each target from
      the original teacher instead, guided (two passes per step), over every base-grid step the student's step
      spans (2 then 4 with the defaults): the target then carries none of stage 1's error, at twice the passes per
      target step. round_target = "trajectory" takes them from the teacher's own sampling paths instead: the
      teacher samples (data = "teacher") keep each path's states on the first round's grid, and a round's student
      learns, from the state at one point of its grid, to land in one DDIM step on the state the teacher's path
      reached at the next (Luhman & Luhman's end-to-end target, taken one student step at a time). No model runs
      to make a target, so a step costs one student pass, and the student trains on the very states it meets
      when sampling from that noise; but only on those paths (samples_per_image per still, w as each was made).
  phase rounds + 1, stage 3 (optional, match_steps > 0; data = "teacher"): the final student samples from each
      teacher sample's own initial noise, with its own few steps, and learns to land where the teacher's
      32-step guided sample landed (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative
      Models": the student's output against the teacher's, from the same noise), backpropagating through all of
      its sampling steps. Stages 1 and 2 each match one step of a chain; this matches the end of the chain, which
      is what a user sees, and corrects the errors the earlier stages leave and compound.
Every grid is the base grid subsampled (base[::step_factor**r]), so the grids nest exactly and the final sampler is the
stock "euler" sampler over the explicit sigmas written to student.json.

Loss: the x0 error with EDM weighting lambda(s) = (s^2 + 1) / s^2 (sigma_data = 1), computed as its equal, the
mean squared error of the UNet's v output against the target's v (x0 = c_skip z + c_out v, c_out^2 lambda = 1).

Data: a folder of still images, encoded once as animate_cli.pipeline encodes (CLIP image embedding, VAE latent
of the noise-augmented image, added time ids fps - 1, motion, noise_aug). Noisy inputs are z = x0 + s * eps with
eps drawn per example. x0 (data = "teacher", the default) is a video the teacher itself made from the still:
samples_per_image guided samples per image, each with its own w ~ U(guidance_range) and noise, drawn once with
Euler (DDIM) on the base grid (the trajectory the student distils) and kept in WORKDIR/teacher-samples.safetensors.
So the student trains on the videos it will meet when sampling, and no video data is needed. data = "stills"
uses the still's own latent on every frame instead (a video without motion: off the teacher's distribution at
low noise, where the student then learns the wrong inputs).

Held-out check (holdout > 0): that many stills (picked by the seed) are kept out of training, and the teacher makes
one guided video from each on the base grid (w evenly over guidance_range, its own noise), kept in
WORKDIR/heldout-samples.safetensors with the teacher's own distance to them on every coarser grid a phase samples
on. At each phase's start and end, and every eval_every steps, the student samples each held-out still on its
phase's grid, one pass per step, from the same noise; the RMSE of its decoded frames to the teacher's (0 to 1, as
benchmarks/tiny_motion_distillation.py measures) goes to the log and WORKDIR/eval.jsonl. It answers what the
loss cannot: whether the student is getting closer to the teacher on stills it never saw, or only fitting the ones
it trains on. keep_best ends each phase with its best-measured student (kept in WORKDIR/phase-N-best while the
phase runs) rather than its last: the one it started with, when no step of the phase did better.

Precision: "auto" runs bf16 autocast (teacher in bf16) on CUDA and float32 elsewhere; "bf16" autocasts on any
device, the teacher's UNet staying float32 on a CPU (the weights, the optimizer and the loss stay float32 always).
On a 2-core CPU with bf16 instructions a tiny-motion stage-1 step at batch 16 took 0.89 s with it, 1.31 s without.
"fp32" never autocasts.

Learning rate: AdamW, annealed linearly to zero within each phase (lr_schedule = "linear", as Salimans & Ho do
for each step-reducing round) or constant; stage 3 starts from match_lr (default lr).

Every step's images, w, sigmas and noise come from a generator seeded by (seed, global step), so a resumed run
continues exactly as an uninterrupted one; torch's RNG states are also saved.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from animate_cli.checkpoint import load_checkpoint_file, save_checkpoint_file
from animate_cli.errors import AnimateError
from animate_cli.sampling import SCHEDULES, sample_euler
from animate_cli.student import first_line, load_student, make_student, save_student, set_guidance

CHECKPOINT = "checkpoint.safetensors"
LOSS_LOG = "loss.jsonl"
SAMPLES_FILE = "teacher-samples.safetensors"
HELDOUT_FILE = "heldout-samples.safetensors"
DECODE_CHUNK = 8  # the held-out check decodes as the presets do
EVAL_LOG = "eval.jsonl"
FINAL_SAMPLER = "euler"  # one DDIM step per grid interval: what stage 2 distils
DATA_SOURCES = ("teacher", "stills")
LR_SCHEDULES = ("linear", "constant")
GUIDANCE_INPUTS = ("frame", "video")
SIGMA_SAMPLINGS = ("lognormal", "uniform")
PRECISIONS = ("auto", "bf16", "fp32")
MATCH_LOSSES = ("latents", "pixels")  # stage 3 compares the two videos as latents, or as the VAE decodes them
MATCH_METRICS = ("mse", "rmse")  # stage 3's loss: the batch's mean square error, or its videos' mean RMSE
RMSE_FLOOR = 1e-3  # the rmse metric is sqrt(mse + floor^2): finite gradient where a video matches exactly
ROUND_TARGETS = ("previous", "teacher", "trajectory")
UNIFORM_SHARE = 0.1  # lognormal sigma sampling keeps this share uniform over the grid: every point is trained


@dataclass
class DistillConfig:
    model: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    width: int | None = None  # None: the model's native size (landscape)
    height: int | None = None
    frames: int | None = None  # None: the model's native count
    stage1_steps: int = 2000
    round_steps: int = 2000
    rounds: int = 2
    step_factor: int = 2  # each round divides the steps by this (2: halving, as Salimans & Ho)
    round_target: str = "previous"  # the rounds' targets: the "previous" phase's student, or the guided "teacher"
    final_steps: int = 8
    schedule: str = "karras"
    lr: float = 1e-5
    guidance_lr_mult: float = 10.0  # the new (zero-initialised) guidance MLP learns faster
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 1
    min_guidance: float = 1.0
    guidance_range: tuple[float, float] = (1.0, 3.0)  # max_guidance w ~ U(range) per video
    fps: int = 7
    motion: int = 127
    noise_aug: float = 0.02
    seed: int = 0
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    data: str = "teacher"  # x0: "teacher" (the teacher's own samples from each still) or "stills"
    samples_per_image: int = 4  # teacher samples per still (data = "teacher")
    lr_schedule: str = "linear"  # "linear": annealed to 0 within each phase; "constant"
    guidance_input: str = "video"  # the embedding gets each frame's scale ("frame") or the video's w ("video")
    sigma_sampling: str = "lognormal"  # which grid points train: "lognormal" in log sigma, or "uniform" over the grid
    sigma_log_mean: float = 0.7  # lognormal: mean and spread of log sigma (0.7: sigma about 2)
    sigma_log_std: float = 1.3
    round_sigma_sampling: str = "uniform"  # the same for the step-reducing rounds' grids
    match_steps: int = 0  # stage 3: optimizer steps matching the teacher's samples end to end (0: no stage 3)
    match_lr: float | None = None  # stage 3's learning rate (None: lr)
    match_loss: str = "latents"  # stage 3's mean square error on the "latents" or on the decoded "pixels"
    match_metric: str = "mse"  # "mse" over the batch, or "rmse": each video's root mean square error, averaged
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 elsewhere; "bf16" (autocast anywhere); "fp32"
    holdout: int = 0  # stills kept out of training: the student's distance to the teacher's videos from them
    eval_every: int = 0  # measure that distance every this many steps (0: at each phase's start and end only)
    keep_best: bool = False  # each phase ends with its best-measured student rather than its last
    ema: float = 0.0  # each phase ends with an exponential moving average of its weights, this decay (0: its last)
    warmup: float = 0.0  # the learning rate rises linearly over this share of each phase's first steps
    init_student: str | None = None  # a student folder (phase-N/ or export) to start from, rather than the teacher

    @property
    def base_steps(self) -> int:
        return self.final_steps * self.step_factor**self.rounds

    @property
    def last_phase(self) -> int:
        return self.rounds + (1 if self.match_steps > 0 else 0)

    def is_match(self, phase: int) -> bool:
        """Whether `phase` is stage 3 (matching the teacher's samples end to end)."""
        return phase == self.rounds + 1

    def phase_steps(self, phase: int) -> int:
        if phase == 0:
            return self.stage1_steps
        return self.match_steps if self.is_match(phase) else self.round_steps

    def phase_lr(self, phase: int) -> float:
        return self.match_lr if self.is_match(phase) and self.match_lr is not None else self.lr

    def sampling(self, phase: int) -> str:
        """How `phase` draws its noise levels: stage 1 by sigma_sampling, the rounds by round_sigma_sampling."""
        return self.sigma_sampling if phase == 0 else self.round_sigma_sampling

    def student_steps(self, phase: int) -> int:
        """Sampling steps the student of `phase` is trained for (32, 16, 8 with the defaults; stage 3 keeps the
        final count)."""
        return self.base_steps // self.step_factor ** min(phase, self.rounds)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        d = {"sigma_sampling": "uniform", **d}  # a run saved before the option drew evenly
        d = {"round_sigma_sampling": d["sigma_sampling"], **d}  # and before this one, its rounds drew alike
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def check_config(c: DistillConfig) -> None:
    if c.schedule not in SCHEDULES or c.schedule == "animatelcm":
        raise AnimateError(f"schedule {c.schedule!r}: choose karras or log_sigma")
    for name in ("stage1_steps", "round_steps", "rounds", "final_steps", "batch_size", "match_steps"):
        low = 0 if name in ("stage1_steps", "round_steps", "rounds", "match_steps") else 1
        if getattr(c, name) < low:
            raise AnimateError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(c, name)}")
    if c.step_factor < 2:
        raise AnimateError(f"--step-factor must be at least 2, got {c.step_factor}")
    if c.base_steps > 1024:
        raise AnimateError(f"{c.final_steps} steps x {c.step_factor}^{c.rounds} rounds = {c.base_steps} base steps: "
                           "too many")
    if c.round_target not in ROUND_TARGETS:
        raise AnimateError(f"--round-target {c.round_target!r}: choose {', '.join(ROUND_TARGETS[:-1])} or "
                           f"{ROUND_TARGETS[-1]}")
    lo, hi = c.guidance_range
    if not 0 <= lo <= hi:
        raise AnimateError(f"--guidance-range {lo} {hi}: expected 0 <= LOW <= HIGH")
    if not c.lr > 0:
        raise AnimateError(f"--lr must be positive, got {c.lr}")
    if c.match_lr is not None and not c.match_lr > 0:
        raise AnimateError(f"--match-lr must be positive, got {c.match_lr}")
    if c.match_loss not in MATCH_LOSSES:
        raise AnimateError(f"--match-loss {c.match_loss!r}: choose {' or '.join(MATCH_LOSSES)}")
    if c.match_metric not in MATCH_METRICS:
        raise AnimateError(f"--match-metric {c.match_metric!r}: choose {' or '.join(MATCH_METRICS)}")
    if c.data not in DATA_SOURCES:
        raise AnimateError(f"--data {c.data!r}: choose {' or '.join(DATA_SOURCES)}")
    if c.samples_per_image < 1:
        raise AnimateError(f"--samples-per-image must be at least 1, got {c.samples_per_image}")
    if c.round_target == "trajectory" and c.data != "teacher":
        raise AnimateError("--round-target trajectory needs --data teacher: its targets are the teacher's own paths")
    if c.match_steps > 0 and c.data != "teacher":
        raise AnimateError("--match-steps needs --data teacher: stage 3 matches the teacher's own samples")
    if c.guidance_input not in GUIDANCE_INPUTS:
        raise AnimateError(f"guidance input {c.guidance_input!r}: choose {' or '.join(GUIDANCE_INPUTS)}")
    for name, value in (("sigma sampling", c.sigma_sampling), ("round sigma sampling", c.round_sigma_sampling)):
        if value not in SIGMA_SAMPLINGS:
            raise AnimateError(f"{name} {value!r}: choose {' or '.join(SIGMA_SAMPLINGS)}")
    if not c.sigma_log_std > 0:
        raise AnimateError(f"--sigma-log-std must be positive, got {c.sigma_log_std}")
    if c.lr_schedule not in LR_SCHEDULES:
        raise AnimateError(f"lr schedule {c.lr_schedule!r}: choose {' or '.join(LR_SCHEDULES)}")
    if c.precision not in PRECISIONS:
        raise AnimateError(f"--precision {c.precision!r}: choose {', '.join(PRECISIONS)}")
    if c.holdout < 0 or c.eval_every < 0:
        raise AnimateError("--holdout and --eval-every must be at least 0")
    if not 0 <= c.ema < 1:
        raise AnimateError(f"--ema must be at least 0 and below 1 (0.999: average over about the last 1,000 "
                           f"steps; 0: no average), got {c.ema}")
    if not 0 <= c.warmup < 1:
        raise AnimateError(f"--warmup is a share of each phase's steps, at least 0 and below 1 (0.1: the first "
                           f"tenth), got {c.warmup}")
    if (c.eval_every or c.keep_best) and not c.holdout:
        raise AnimateError(f"{'--eval-every' if c.eval_every else '--keep-best'} needs --holdout N: the stills "
                           "whose teacher videos the student is measured against")


# ---------------------------------------------------------------- sigma grids
def base_sigmas(c: DistillConfig, scheduler_config: dict) -> torch.Tensor:
    return SCHEDULES[c.schedule](c.base_steps, scheduler_config["sigma_min"], scheduler_config["sigma_max"])


def grid(c: DistillConfig, scheduler_config: dict, steps: int) -> torch.Tensor:
    """The `steps`-step grid (steps + 1 sigmas, the last 0): the base grid taken every base/steps points."""
    stride = c.base_steps // steps
    return base_sigmas(c, scheduler_config)[::stride].clone()


def sigma_probabilities(c: DistillConfig, sigmas: torch.Tensor, phase: int = 0) -> torch.Tensor:
    """How often each non-zero point of phase `phase`'s grid is drawn for training (c.sampling(phase)). "uniform":
    equally. "lognormal" (stage 1's default): in proportion to a normal density in log sigma (sigma_log_mean,
    sigma_log_std), mixed with UNIFORM_SHARE of uniform. How far a student's error moves the final video depends
    strongly on the noise level: on tiny-motion, swapping the teacher for a stage-1 student on 4 of the 32 steps
    moved the output, per unit of root stage-1 loss there, 0.087 RMSE at sigma 3 to 0.8, 0.040 at 13 to 4.5, 0.025
    at 45 to 18, 0.034 at 0.46 to 0.14, and 0.003-0.005 above sigma 160 and below 0.04. Uniform draws spend 12 of
    the 32 points there. The default centre (log sigma 0.7: sigma about 2) and spread follow this measurement: 400
    more stage-1 steps with them took a 1,300-step uniform stage-1 student from 0.0183 to 0.0153 RMSE (32-step
    samples against the teacher's, 16 held-out clips), where 400 more uniform steps reached 0.0174. On the halving
    rounds' coarser grids uniform draws did better (the rounds' default): two rounds from one stage-1 student left
    it 0.0198 from the teacher's 32-step output with them, 0.0207 with these lognormal ones (and 0.0202 against
    0.0200 after 60 stage-3 steps each)."""
    n = len(sigmas) - 1
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if c.sampling(phase) == "uniform":
        return uniform
    z = (sigmas[:n].double().log() - c.sigma_log_mean) / c.sigma_log_std
    density = torch.exp(-0.5 * z**2)
    return (1 - UNIFORM_SHARE) * density / density.sum() + UNIFORM_SHARE * uniform


# ---------------------------------------------------------------- data
@dataclass
class Data:
    names: list[str]
    x0: torch.Tensor  # [N, C, h, w] scaled VAE latents of the stills (the 'video' every frame repeats)
    embeds: torch.Tensor  # [N, 1, D] CLIP image embeddings
    image_latents: torch.Tensor  # [N, C, h, w] VAE latents of the noise-augmented stills (unscaled, as SVD)
    time_ids: torch.Tensor  # [N, 3]
    videos: torch.Tensor | None = None  # [M, F, C, h, w] the teacher's samples (data = "teacher"), float32
    video_image: torch.Tensor | None = None  # [M] the still each sample was made from
    video_w: torch.Tensor | None = None  # [M] the guidance (max_guidance) each sample was made with
    paths: torch.Tensor | None = None  # [M, n + 1, F, C, h, w] round_target "trajectory": each sample's states
    # on the first round's n-step grid (paths[:, 0] = the initial noise x sigma_max, paths[:, -1] = the video)


def image_files(folder: Path) -> list[Path]:
    from animate_cli.media import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.exists():
        raise AnimateError(f"images folder {folder} not found")
    if not folder.is_dir():
        raise AnimateError(f"{folder} is not a folder; give a folder of still images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AnimateError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def resolve_geometry(c: DistillConfig, model) -> DistillConfig:
    """Width, height and frames filled in from the model where not given, checked against its multiple."""
    import dataclasses

    w, h = c.width, c.height
    if w is None or h is None:
        nw, nh = model.native_size
        w, h = (w or max(nw, nh)), (h or min(nw, nh))
    m = model.size_multiple
    if w % m or h % m or w <= 0 or h <= 0:
        raise AnimateError(f"size {w}x{h}: width and height must be positive multiples of {m} for this model")
    return dataclasses.replace(c, width=w, height=h, frames=c.frames or model.frames)


@torch.no_grad()
def encode_images(model, files: list[Path], c: DistillConfig) -> Data:
    from animate_cli.media import fit_image, load_image
    from animate_cli.pipeline import Settings, encode, make_generators, preprocess

    settings = Settings(width=c.width, height=c.height, frames=c.frames, steps=c.base_steps, fps=c.fps,
                        motion=c.motion, noise_aug=c.noise_aug, min_guidance=c.min_guidance,
                        max_guidance=c.guidance_range[1], decode_chunk=1, sampler=FINAL_SAMPLER, schedule=c.schedule)
    parts = {"x0": [], "embeds": [], "image_latents": [], "time_ids": []}
    sf = model.vae.config.scaling_factor
    for i, path in enumerate(files):
        image = fit_image(load_image(path), (c.width, c.height), "crop")
        pixels, clip_pixels = preprocess(model, [image])
        cond = encode(model, pixels, clip_pixels, settings, make_generators([c.seed + i], model.device))
        x0 = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist.mode() * sf
        parts["x0"].append(x0.float())
        parts["embeds"].append(cond.image_embeds)
        parts["image_latents"].append(cond.image_latents)
        parts["time_ids"].append(cond.added_time_ids)
    return Data([p.name for p in files], **{k: torch.cat(v) for k, v in parts.items()})


# ---------------------------------------------------------------- the UNet as an EDM v-model
def unet_v(unet, z, sigma, embeds, latents, time_ids, dtype) -> torch.Tensor:
    """SVD's UNet output v (float32) at noisy latents z [B, F, C, h, w], sigma [B]; latents [B, F, C, h, w]."""
    s = sigma.view(-1, 1, 1, 1, 1)
    x_in = (z / (s**2 + 1).sqrt()).to(dtype)
    c_noise = 0.25 * sigma.log()
    v = unet(torch.cat([x_in, latents.to(dtype)], dim=2), c_noise, encoder_hidden_states=embeds.to(dtype),
             added_time_ids=time_ids.to(dtype), return_dict=False)[0]
    return v.float()


def x0_from_v(z, sigma, v):
    s = sigma.view(-1, 1, 1, 1, 1)
    return z / (s**2 + 1) - s / (s**2 + 1).sqrt() * v


def v_from_x0(z, sigma, x0):
    """The v for which the EDM denoiser gives x0 at (z, sigma)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return (x0 - z / (s**2 + 1)) / (-s / (s**2 + 1).sqrt())


def frame_scales(w: torch.Tensor, min_guidance: float, frames: int) -> torch.Tensor:
    """[B, F, 1, 1, 1]: SVD's per-frame guidance, linear from min_guidance (first frame) to w (last)."""
    ramp = torch.linspace(0, 1, frames, device=w.device)
    return (min_guidance + (w[:, None] - min_guidance) * ramp[None]).view(len(w), frames, 1, 1, 1)


def guided_teacher_v(unet, batch: Batch, z, sigma, min_guidance: float, dtype) -> torch.Tensor:
    """The teacher's classifier-free-guided v: one call on a batch of two halves (uncond: zero embedding and zero
    image latent), as animate_cli.pipeline.make_denoiser does, with per-video w."""
    two = lambda t: torch.cat([t, t])  # noqa: E731
    v = unet_v(unet, two(z), two(sigma), torch.cat([torch.zeros_like(batch.embeds), batch.embeds]),
               torch.cat([torch.zeros_like(batch.latents), batch.latents]), two(batch.time_ids), dtype)
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + frame_scales(batch.w, min_guidance, z.shape[1]) * (v_cond - v_uncond)


def student_v(student, batch: Batch, z, sigma, dtype) -> torch.Tensor:
    set_guidance(student, batch.w)
    return unet_v(student, z, sigma, batch.embeds, batch.latents, batch.time_ids, dtype)


# ---------------------------------------------------------------- batches
@dataclass
class Batch:
    index: torch.Tensor  # [B] image indices
    w: torch.Tensor  # [B] guidance (max_guidance) per video
    k: torch.Tensor  # [B] index of sigma on the student's grid
    sigma: torch.Tensor  # [B]
    z: torch.Tensor  # [B, F, C, h, w] noisy latents
    embeds: torch.Tensor
    latents: torch.Tensor  # [B, F, C, h, w] image latents on every frame
    time_ids: torch.Tensor
    sample: torch.Tensor | None = None  # [B] which teacher sample is each x0 (data = "teacher")
    z_next: torch.Tensor | None = None  # [B, F, C, h, w] round_target "trajectory": where the teacher's path went


def step_generator(c: DistillConfig, global_step: int) -> torch.Generator:
    return torch.Generator().manual_seed(c.seed * 1_000_003 + global_step)


def draw_batch(c: DistillConfig, data: Data, sigmas: torch.Tensor, global_step: int, device,
               phase: int = 0) -> Batch:
    """Videos (a teacher sample with the still it was made from, or a still), w ~ U(guidance_range), sigma
    (a grid point drawn as sigma_probabilities says) and noise for one step; a function of (seed, global_step) alone.
    w is drawn afresh rather than taken from the sample, as Meng et al. draw it independently of the data: with
    a few hundred samples, their w values alone would leave the guidance embedding untrained in between."""
    g = step_generator(c, global_step)
    b = c.batch_size
    sample = None
    if data.videos is not None:
        sample = torch.randint(len(data.videos), (b,), generator=g)
        index = data.video_image[sample]
        x0 = data.videos[sample].to(device)
    else:
        index = torch.randint(len(data.names), (b,), generator=g)
        x0 = data.x0[index.to(data.x0.device)].to(device).unsqueeze(1).expand(-1, c.frames, -1, -1, -1)
    lo, hi = c.guidance_range
    w = lo + (hi - lo) * torch.rand(b, generator=g)  # fresh w (not the sample's): the embedding learns all of w
    k = draw_points(c, sigmas, b, g, phase)
    sigma = sigmas[k].float()
    eps = torch.randn(x0.shape, generator=g).to(device)
    z = x0 + sigma.to(device).view(-1, 1, 1, 1, 1) * eps
    return Batch(index=index, w=w.to(device), k=k, sigma=sigma.to(device), z=z, sample=sample,
                 **conditioning(data, index, c.frames, device))


def draw_points(c: DistillConfig, sigmas: torch.Tensor, b: int, g: torch.Generator, phase: int) -> torch.Tensor:
    """[b] indices of grid points to train at, drawn as sigma_probabilities says."""
    if c.sampling(phase) == "uniform":  # randint, as before the option: a uniform run's draws stay the same
        return torch.randint(len(sigmas) - 1, (b,), generator=g)
    return torch.multinomial(sigma_probabilities(c, sigmas, phase), b, replacement=True, generator=g)


def draw_path_batch(c: DistillConfig, data: Data, sigmas: torch.Tensor, global_step: int, device,
                    phase: int) -> Batch:
    """A round with round_target "trajectory": teacher samples, each with the still and w it was made from, at a
    point k of the round's grid (drawn as draw_batch draws it): z = the state its path reached at sigmas[k], z_next
    = the state at sigmas[k + 1]; a function of (seed, global_step) alone."""
    g = step_generator(c, global_step)
    b = c.batch_size
    sample = torch.randint(len(data.paths), (b,), generator=g)
    index = data.video_image[sample]
    k = draw_points(c, sigmas, b, g, phase)
    stride = (data.paths.shape[1] - 1) // (len(sigmas) - 1)  # the round's grid within the kept one
    sigma = sigmas[k].float()
    return Batch(index=index, w=data.video_w[sample].to(device), k=k, sigma=sigma.to(device),
                 z=data.paths[sample, k * stride].to(device), z_next=data.paths[sample, (k + 1) * stride].to(device),
                 sample=sample, **conditioning(data, index, c.frames, device))


def draw_match_batch(c: DistillConfig, data: Data, sigmas: torch.Tensor, global_step: int, device) -> Batch:
    """Stage 3: teacher samples, each with the still, w and initial noise it was made from (z: that noise at
    sigmas[0], drawn again by sample_draw); a function of (seed, global_step) alone."""
    g = step_generator(c, global_step)
    sample = torch.randint(len(data.videos), (c.batch_size,), generator=g)
    index = data.video_image[sample]
    sigma = sigmas[:1].float().expand(len(sample))
    shape = (c.frames, *data.x0.shape[1:])
    noise = torch.stack([sample_draw(c, j, shape)[1] for j in sample.tolist()])
    z = noise.to(device) * sigma.to(device).view(-1, 1, 1, 1, 1)
    return Batch(index=index, w=data.video_w[sample].to(device), k=torch.zeros(len(sample), dtype=torch.long),
                 sigma=sigma.to(device), z=z, sample=sample, **conditioning(data, index, c.frames, device))


def conditioning(data: Data, index: torch.Tensor, frames: int, device) -> dict:
    """Batch's embeds, latents (on every frame) and time_ids for the stills `index`, float32 on `device`."""
    i = index.to(data.embeds.device)
    return {"embeds": data.embeds[i].to(device).float(),
            "latents": data.image_latents[i].to(device).float().unsqueeze(1).expand(-1, frames, -1, -1, -1),
            "time_ids": data.time_ids[i].to(device).float()}


# ---------------------------------------------------------------- the teacher's own samples
def samples_fingerprint(c: DistillConfig, data: Data, sigmas: torch.Tensor) -> dict:
    """What the teacher samples depend on: a saved file is reused only when all of it matches."""
    return {"model": c.model, "images": data.names, "width": c.width, "height": c.height, "frames": c.frames,
            "samples_per_image": c.samples_per_image, "guidance_range": list(c.guidance_range),
            "min_guidance": c.min_guidance, "fps": c.fps, "motion": c.motion, "noise_aug": c.noise_aug,
            "seed": c.seed, "sigmas": [round(float(x), 6) for x in sigmas]}


def sample_draw(c: DistillConfig, j: int, shape: tuple) -> tuple[float, torch.Tensor]:
    """Teacher sample j's guidance w ~ U(guidance_range) and its initial noise (unit variance), from (seed, j)."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + 999_983 + j)
    lo, hi = c.guidance_range
    return lo + (hi - lo) * torch.rand(1, generator=g).item(), torch.randn(shape, generator=g)


@torch.no_grad()
def teacher_samples(c: DistillConfig, data: Data, unet, sigmas: torch.Tensor, device, dtype, autocast,
                    progress=None, keep_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None]:
    """samples_per_image guided videos per still, made by the teacher with Euler on `sigmas` (the base grid):
    (videos [M, F, C, h, w] float32 on the CPU, image index [M], w [M], paths). Sample j's w and noise come from a
    generator seeded by (seed, j) alone, so they do not depend on the chunking. keep_every > 0: paths [M, n + 1, F,
    C, h, w] holds each sample's state at every keep_every-th point of `sigmas` (n = steps / keep_every), the
    last being the video; else None."""
    n, per = len(data.names), c.samples_per_image
    image = torch.arange(n).repeat_interleave(per)
    draws = [sample_draw(c, j, (c.frames, *data.x0.shape[1:])) for j in range(n * per)]
    w = torch.tensor([d[0] for d in draws])
    noises = [d[1] for d in draws]
    videos, paths = [], []
    sig = sigmas.to(device)
    for start in range(0, n * per, c.batch_size):
        pick = torch.arange(start, min(start + c.batch_size, n * per))
        b = len(pick)
        batch = Batch(index=image[pick], w=w[pick].to(device), k=torch.zeros(b, dtype=torch.long),
                      sigma=sig[:1].expand(b), z=torch.empty(0), **conditioning(data, image[pick], c.frames, device))

        kept, calls = [], itertools.count()

        def denoise(x, sigma, batch=batch, b=b, kept=kept, calls=calls):
            if keep_every and next(calls) % keep_every == 0:  # a kept point's state, as the sampler has it
                kept.append(x.float().cpu())
            with autocast():
                v = guided_teacher_v(unet, batch, x, sigma.expand(b), c.min_guidance, dtype)
            return x0_from_v(x, sigma.expand(b), v)

        noise = torch.stack([noises[j] for j in pick.tolist()]).to(device)
        video = sample_euler(denoise, noise * sig[0], sig).float().cpu()
        videos.append(video)
        if keep_every:
            paths.append(torch.stack(kept + [video], dim=1))  # [b, n + 1, F, C, h, w]
        if progress is not None:
            progress("teacher samples", int(pick[-1]) + 1, n * per)
    return torch.cat(videos), image, w, torch.cat(paths) if keep_every else None


def attach_teacher_samples(s: Session, progress=None, log=print) -> None:
    """data = "teacher": load WORKDIR/teacher-samples.safetensors if it matches this run (a file kept with the
    teacher's paths also matches a run that needs none: its videos alone are read), else make it with the original
    UNet (s.base_unet) and save it."""
    from safetensors.torch import save_file

    c = s.config
    if c.data != "teacher":
        return
    base = base_sigmas(c, s.scheduler_config)
    keep = path_stride(c)
    want = samples_fingerprint(c, s.data, base)
    if keep:
        want["paths_every"] = keep  # (absent otherwise: files made before paths existed still match)
    path = s.workdir / SAMPLES_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fingerprint", "null"))
            if not keep and isinstance(meta, dict):  # samples kept with their paths serve a run that needs none
                meta.pop("paths_every", None)
            if meta == want:
                s.data.videos, s.data.video_image, s.data.video_w = (f.get_tensor(n) for n in ("videos", "image", "w"))
                s.data.paths = f.get_tensor("paths") if keep else None  # (a matching file with keep holds them)
                return
        log(f"{path.name} was made for another run: making it again")
    total = len(s.data.names) * c.samples_per_image
    log(f"teacher samples: {total} videos ({c.samples_per_image} per image), {c.base_steps} guided steps each")
    start = time.perf_counter()
    if progress is None:  # plain lines: about every tenth
        marks = {max(1, round(total * q / 10)) for q in range(1, 11)}
        done = [0]

        def progress(name, step, total_):
            if any(done[0] < m <= step for m in marks):
                log(f"{name}: {step}/{total_}")
            done[0] = step

    videos, image, w, paths = teacher_samples(c, s.data, s.base_unet, base, s.device, s.teacher_dtype, s.autocast,
                                              progress, keep_every=keep)
    log(f"teacher samples: made in {time.perf_counter() - start:.0f} s, kept in {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"videos": videos.contiguous(), "image": image.contiguous(), "w": w.contiguous()}
    if paths is not None:
        tensors["paths"] = paths.contiguous()
    save_file(tensors, str(tmp), metadata={"fingerprint": json.dumps(want)})
    tmp.replace(path)
    s.data.videos, s.data.video_image, s.data.video_w, s.data.paths = videos, image, w, paths


# ---------------------------------------------------------------- the held-out check
@dataclass
class Heldout:
    """The stills kept out of training (holdout), with one teacher video each: the teacher's guided Euler sample on
    the base grid from `noise` (unit variance, x sigma_max to start), at guidance w, and its frames as the pipeline
    decodes them; `teacher` maps each coarser grid a phase samples on (its step count) to the teacher's own
    distance there, sampled the same way (RMSE of the frames, 0 to 1)."""
    data: Data
    noise: torch.Tensor  # [N, F, C, h, w]
    frames: torch.Tensor  # [N, F, H, W, 3] uint8
    w: torch.Tensor  # [N]
    teacher: dict[int, float]


def split_heldout(c: DistillConfig, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training stills, held-out stills): holdout of them picked by the run's seed, each list in name order."""
    if not c.holdout:
        return files, []
    if c.holdout >= len(files):
        raise AnimateError(f"--holdout {c.holdout}: the folder holds {len(files)} still"
                           f"{'' if len(files) == 1 else 's'}; hold out fewer, so some are left to train on")
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + 999_979)
    held = set(torch.randperm(len(files), generator=g)[:c.holdout].tolist())
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def heldout_draw(c: DistillConfig, j: int, shape: tuple) -> tuple[float, torch.Tensor]:
    """Held-out video j's guidance (evenly over guidance_range) and initial noise, from (seed, j), a stream apart
    from the training samples'."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + 499_979 + j)
    lo, hi = c.guidance_range
    return lo + (hi - lo) * (j + 0.5) / c.holdout, torch.randn(shape, generator=g)


def heldout_grids(c: DistillConfig) -> list[int]:
    """The step counts the phases sample on, coarsest last (base_steps first)."""
    return sorted({c.student_steps(p) for p in range(c.last_phase + 1)}, reverse=True)


def frame_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMSE of two uint8 videos on a 0-to-1 scale, as the distillation benchmark measures it."""
    return (a.float() - b.float()).pow(2).mean().sqrt().item() / 255


@torch.no_grad()
def decode_frames(s: Session, latents: torch.Tensor) -> torch.Tensor:
    """uint8 frames [N, F, H, W, 3] of latents [N, F, C, h, w], decoded as the pipeline decodes (DECODE_CHUNK
    frames per VAE call), on the CPU."""
    from types import SimpleNamespace

    from animate_cli.pipeline import decode

    with s.autocast():
        return torch.cat([decode(SimpleNamespace(vae=s.vae), v[None].to(s.device), DECODE_CHUNK).cpu()
                          for v in latents])


@torch.no_grad()
def attach_heldout(s: Session, data: Data, log=print) -> None:
    """The held-out stills (`data`, encoded): load WORKDIR/heldout-samples.safetensors if it matches this run, else
    make it with the original UNet (the teacher's videos and its own distance on every coarser grid)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    c = s.config
    want = {**samples_fingerprint(c, data, base_sigmas(c, s.scheduler_config)), "holdout": c.holdout,
            "grids": heldout_grids(c), "decode_chunk": DECODE_CHUNK}
    del want["samples_per_image"]
    path = s.workdir / HELDOUT_FILE
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("fingerprint", "null")) == want:
            t = load_file(str(path))
            teacher = {int(k): v for k, v in json.loads(meta["teacher"]).items()}
            s.heldout = Heldout(data, t["noise"], t["frames"], t["w"], teacher)
            return
        log(f"{path.name} was made for another run: making it again")
    n = len(data.names)
    log(f"held-out check: the teacher's videos from {n} held-out still{'' if n == 1 else 's'}")
    draws = [heldout_draw(c, j, (c.frames, *data.x0.shape[1:])) for j in range(n)]
    w = torch.tensor([d[0] for d in draws])
    noise = torch.stack([d[1] for d in draws])

    def teacher_x0(x, sigma, batch):
        with s.autocast():
            v = guided_teacher_v(s.base_unet, batch, x, sigma.expand(len(x)), c.min_guidance, s.teacher_dtype)
        return x0_from_v(x, sigma.expand(len(x)), v)

    frames = {steps: decode_frames(s, sample_heldout(s, data, noise, w, steps, teacher_x0))
              for steps in heldout_grids(c)}
    teacher = {steps: frame_distance(f, frames[c.base_steps]) for steps, f in frames.items() if steps != c.base_steps}
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"noise": noise, "frames": frames[c.base_steps], "w": w}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"fingerprint": json.dumps(want), "teacher": json.dumps(teacher)})
    tmp.replace(path)
    s.heldout = Heldout(data, noise, frames[c.base_steps], w, teacher)


def sample_heldout(s: Session, data: Data, noise: torch.Tensor, w: torch.Tensor, steps: int, x0_fn) -> torch.Tensor:
    """Each held-out still's video, Euler on the `steps`-step grid from its noise; x0_fn(x, sigma, batch) -> x0.
    float32, on the CPU."""
    sig = grid(s.config, s.scheduler_config, steps).to(s.device)
    out = []
    for start in range(0, len(noise), s.config.batch_size):
        pick = torch.arange(start, min(start + s.config.batch_size, len(noise)))
        b = len(pick)
        batch = Batch(index=pick, w=w[pick].to(s.device), k=torch.zeros(b, dtype=torch.long),
                      sigma=sig[:1].expand(b), z=torch.empty(0), **conditioning(data, pick, s.config.frames, s.device))
        out.append(sample_euler(lambda x, sigma, batch=batch: x0_fn(x, sigma, batch),
                                noise[pick].to(s.device) * sig[0], sig).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def heldout_distance(s: Session) -> float:
    """How far the student of the current phase, sampling each held-out still with Euler on the phase's grid, one
    pass per step, lands from the teacher's video from the same noise: RMSE of the decoded frames (0 to 1)."""
    h = s.heldout

    def student_x0(x, sigma, batch):
        with s.autocast():
            v = student_v(s.student, batch, x, sigma.expand(len(x)), torch.float32)
        return x0_from_v(x, sigma.expand(len(x)), v)

    was_training = s.student.training
    s.student.eval()
    try:
        with averaged(s):
            video = sample_heldout(s, h.data, h.noise, h.w, s.config.student_steps(s.phase), student_x0)
        return frame_distance(decode_frames(s, video), h.frames)
    finally:
        s.student.train(was_training)


def phase_step(s: Session, global_step: int) -> int:
    """The current phase's own step count at `global_step` (a step of this phase)."""
    return global_step - (s.global_step - s.step)


def best_folder(workdir: Path, phase: int) -> Path:
    return Path(workdir) / f"phase-{phase}-best"


def check_heldout(s: Session, log=print) -> float:
    """Measure the student now; log it with the bar it has to beat, append it to WORKDIR/eval.jsonl, and with
    keep_best save it to WORKDIR/phase-N-best when it is the phase's best so far."""
    c = s.config
    d = heldout_distance(s)
    steps = c.student_steps(s.phase)
    bar = s.heldout.teacher.get(steps)
    best = s.extras.get("best")
    improved = best is None or d < best[0]
    if improved:
        s.extras["best"] = (d, s.global_step)
    log(f"held-out: the {steps}-step student is {d:.5f} from the teacher's {c.base_steps}-step videos"
        + (f" (the teacher's own {steps} steps: {bar:.5f})" if bar is not None else "")
        + (f"; best of this phase: {best[0]:.5f} at its step {phase_step(s, best[1])}" if not improved else ""))
    with (s.workdir / EVAL_LOG).open("a") as f:
        f.write(json.dumps({"global_step": s.global_step, "phase": s.phase, "step": s.step, "steps": steps,
                            "distance": d, "teacher_distance": bar, "time": round(time.time(), 3)}) + "\n")
    if improved and c.keep_best:
        folder = best_folder(s.workdir, s.phase)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with averaged(s):
            save_student(s.student, tmp, sampler_config(s, s.phase))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return d


def phase_best(workdir: Path, phase: int, global_step: int) -> tuple[float, int] | None:
    """(distance, global step) of the best check of `phase` in WORKDIR/eval.jsonl up to `global_step`."""
    path = Path(workdir) / EVAL_LOG
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if row["phase"] == phase and row["global_step"] <= global_step:
                rows.append((float(row["distance"]), int(row["global_step"])))
        except (ValueError, KeyError, TypeError):
            continue
    return min(rows) if rows else None


def restore_best(s: Session, log=print) -> None:
    """keep_best at a phase's end: take the phase's best-measured student, if its folder holds that step."""
    best = s.extras.get("best")
    folder = best_folder(s.workdir, s.phase)
    if best is None or best[1] == s.global_step or not (folder / "student.json").is_file():
        return
    unet, meta = load_student(folder, torch.float32, s.device)
    if meta.get("distillation", {}).get("global_step") != best[1]:
        log(f"{folder.name} does not hold step {best[1]}: keeping the last student")
        return
    s.student.load_state_dict(unet.state_dict(), strict=True)
    log(f"keeping the student of the phase's step {phase_step(s, best[1])} (held-out {best[0]:.5f}) rather than "
        "its last")


def path_stride(c: DistillConfig) -> int:
    """round_target "trajectory": the teacher's paths are kept every this many base-grid points (the first round's
    grid, on which every later round's grid lies); 0: not kept."""
    return c.base_steps // c.student_steps(1) if c.round_target == "trajectory" and c.rounds > 0 else 0


# ---------------------------------------------------------------- targets and loss
@torch.no_grad()
def stage1_target(s: Session, batch: Batch) -> torch.Tensor:
    with s.autocast():
        return guided_teacher_v(s.teacher, batch, batch.z, batch.sigma, s.config.min_guidance, s.teacher_dtype)


@torch.no_grad()
def stage2_target(s: Session, batch: Batch) -> torch.Tensor:
    """Where the round's target model lands in DDIM steps from (z, s_k) over the points of its finer grid that one
    student step spans -> the x0 one student step needs -> v. round_target "previous": step_factor steps of the
    previous phase's student (one pass each); "teacher": base_steps / student_steps steps of the original teacher,
    guided (two passes each); "trajectory": no model, the teacher's kept path from z (batch.z_next)."""
    c = s.config
    steps = c.student_steps(s.phase)
    if c.round_target == "trajectory":  # where the teacher's path went from z
        sig = s.sigmas.to(s.device)
        ratio = (sig[batch.k + 1] / sig[batch.k]).view(-1, 1, 1, 1, 1)
        return v_from_x0(batch.z, batch.sigma, (batch.z_next - ratio * batch.z) / (1 - ratio))
    if c.round_target == "teacher":
        fine = c.base_steps

        def x0_at(x, a):
            return x0_from_v(x, a, guided_teacher_v(s.teacher, batch, x, a, c.min_guidance, s.teacher_dtype))
    else:
        fine = c.student_steps(s.phase - 1)

        def x0_at(x, a):
            return x0_from_v(x, a, student_v(s.teacher, batch, x, a, s.teacher_dtype))

    span = fine // steps
    fine_grid = grid(c, s.scheduler_config, fine).to(s.device)
    k = batch.k.to(s.device)
    z = batch.z
    x = z
    for j in range(span):
        a, b = fine_grid[span * k + j], fine_grid[span * k + j + 1]
        with s.autocast():
            d = x0_at(x, a)
        x = d + (b / a).view(-1, 1, 1, 1, 1) * (x - d)
    s0 = fine_grid[span * k]
    ratio = (fine_grid[span * k + span] / s0).view(-1, 1, 1, 1, 1)  # 0 on the last step: the target is x itself
    target_x0 = (x - ratio * z) / (1 - ratio)
    return v_from_x0(z, s0, target_x0)


def student_sample(s: Session, batch: Batch) -> torch.Tensor:
    """Stage 3: the student's own DDIM (Euler) sampling on its grid from batch.z, differentiable end to end."""
    sig = s.sigmas.to(s.device)
    x = batch.z
    for i in range(len(sig) - 1):
        a = sig[i].expand(len(x))
        with s.autocast():
            x0 = x0_from_v(x, a, student_v(s.student, batch, x, a, torch.float32))
        x = x0 + (sig[i + 1] / sig[i]) * (x - x0)
    return x


def decoded(s: Session, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """Frames [B, F, 3, H, W] (float32, -1 to 1, neither clamped nor rounded) of latents [B, F, C, h, w], decoded as
    the presets decode (each video `chunk` frames per VAE call) and differentiable in the latents."""
    b, f = latents.shape[:2]
    x = latents / s.vae.config.scaling_factor
    with s.autocast():
        if f % chunk == 0:  # every call `chunk` frames of one video: all of them in one batch
            pixels = s.vae.decode(x.flatten(0, 1), num_frames=chunk).sample
        else:
            pixels = torch.cat([s.vae.decode(v[i:i + chunk], num_frames=len(v[i:i + chunk])).sample
                                for v in x for i in range(0, f, chunk)])
    return pixels.float().unflatten(0, (b, f))


def match_error(sample: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    """Stage 3's loss between the student's videos and the teacher's [B, ...]. "mse": the mean square error over
    the batch, where a few far-off videos weigh most. "rmse": each video's root mean square error (floored at
    RMSE_FLOOR), averaged over the videos, as the benchmark scores students clip by clip; each video's gradient is
    its mean square error's divided by twice its RMSE, so the far-off ones weigh less."""
    if metric == "mse":
        return F.mse_loss(sample, target)
    per_video = (sample.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_video + RMSE_FLOOR**2).sqrt().mean()


def batch_loss(s: Session, batch: Batch) -> torch.Tensor:
    if s.config.is_match(s.phase):  # the student's sample against the teacher's, from the same noise
        sample, target = student_sample(s, batch), s.data.videos[batch.sample].to(s.device)
        if s.config.match_loss == "pixels":  # as the distance to the teacher is measured: on the decoded frames
            with torch.no_grad():
                target = decoded(s, target)
            sample = decoded(s, sample)
        return match_error(sample, target, s.config.match_metric)
    target = stage1_target(s, batch) if s.phase == 0 else stage2_target(s, batch)
    with s.autocast():
        v = student_v(s.student, batch, batch.z, batch.sigma, torch.float32)
    return F.mse_loss(v, target)


# ---------------------------------------------------------------- session
@dataclass
class Session:
    config: DistillConfig
    workdir: Path
    device: torch.device
    data: Data
    scheduler_config: dict
    base_unet: torch.nn.Module | None  # the original teacher (phase 0; every round with round_target teacher)
    student: torch.nn.Module
    teacher: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    phase: int = 0
    step: int = 0  # within the phase
    global_step: int = 0
    teacher_dtype: torch.dtype = torch.float32
    last_loss: float | None = None
    heldout: Heldout | None = None  # holdout > 0: the stills and teacher videos the student is measured on
    vae: torch.nn.Module | None = None  # holdout > 0: the VAE, to decode what the check samples
    ema: dict[str, torch.Tensor] | None = None  # config.ema > 0: the phase's averaged weights (float32)
    extras: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.phase > self.config.last_phase

    @property
    def sigmas(self) -> torch.Tensor:
        """The current student's grid."""
        return grid(self.config, self.scheduler_config, self.config.student_steps(min(self.phase, self.config.rounds)))

    def autocast(self):
        if self.config.precision == "bf16" or (self.config.precision == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def phase_name(c: DistillConfig, phase: int) -> str:
    if phase == 0:
        return f"stage 1: guidance, {c.student_steps(0)} steps"
    if c.is_match(phase):
        return f"stage 3: {c.final_steps} steps matching the teacher's {c.base_steps}-step samples"
    to = {"teacher": " (targets from the teacher)", "trajectory": " (targets on the teacher's paths)"}.get(
        c.round_target, "")
    return f"stage 2 round {phase}/{c.rounds}: {c.student_steps(phase - 1)} -> {c.student_steps(phase)} steps{to}"


def stage_number(c: DistillConfig, phase: int) -> int:
    return 1 if phase == 0 else 3 if c.is_match(phase) else 2


def phase_folder(workdir: Path, phase: int) -> Path:
    return Path(workdir) / f"phase-{phase}"


def new_optimizer(c: DistillConfig, student) -> torch.optim.Optimizer:
    guidance = [p for n, p in student.named_parameters() if n.startswith("add_embedding.mlp.")]
    ids = {id(p) for p in guidance}
    rest = [p for p in student.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": rest, "lr": c.lr},
                              {"params": guidance, "lr": c.lr * c.guidance_lr_mult}],
                             weight_decay=c.weight_decay)


def open_session(options: dict, images: Path, workdir: Path, device: torch.device, log=print,
                 progress=None) -> Session:
    """Load the model, encode the images, and build the student: fresh (DistillConfig(**options)), or resumed
    from WORKDIR/checkpoint.safetensors, whose config then wins; `options` (what the user gave) may only change the step
    counts of phases not yet finished."""
    from animate_cli.models import load_model

    workdir = Path(workdir)
    all_files = image_files(images)
    if workdir.exists() and not workdir.is_dir():
        raise AnimateError(f"--workdir {workdir} is a file; give a folder")
    saved = load_checkpoint_data(workdir)
    if saved is not None:
        c = merge_config(DistillConfig.from_dict(saved["config"]), options, saved["phase"])
    else:
        c = DistillConfig(**options)
    check_config(c)
    files, held = split_heldout(c, all_files)
    model = load_model(c.model, torch.float32, device, progress=True)
    c = resolve_geometry(c, model)
    data = encode_images(model, files, c)
    held_data = encode_images(model, held, c) if held else None
    if saved is not None and saved["images"] != data.names:
        raise AnimateError(f"{workdir / CHECKPOINT} was trained on other images ({len(saved['images'])} files); "
                           "give the same folder, or another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)  # only once the options and the images are known to be good
    teacher_dtype = torch.bfloat16 if device.type == "cuda" and c.precision != "fp32" else torch.float32
    student = make_student(model.unet, per_frame=c.guidance_input == "frame", min_guidance=c.min_guidance,
                           seed=c.seed)  # the same command makes the same student in any process
    student = student.float().train().requires_grad_(True)
    if c.init_student and saved is None:  # (a resumed run's checkpoint holds its own weights)
        start_from(student, Path(c.init_student), c)
    base = torch.nn.Module.to(model.unet, dtype=teacher_dtype).eval().requires_grad_(False)  # no diffusers warning
    sigma_range = {k: float(model.scheduler_config[k]) for k in ("sigma_min", "sigma_max")}
    decodes = held_data is not None or (c.match_steps > 0 and c.match_loss == "pixels")  # the check, stage 3
    vae = model.vae.eval().requires_grad_(False) if decodes else None
    del model
    if c.gradient_checkpointing or (c.gradient_checkpointing is None and device.type == "cuda"):
        student.enable_gradient_checkpointing()
    s = Session(config=c, workdir=workdir, device=device, data=data, scheduler_config=sigma_range,
                base_unet=base, student=student, teacher_dtype=teacher_dtype, vae=vae)
    s.extras["model_source"] = c.model
    s.optimizer = new_optimizer(c, student)
    if saved is not None:
        restore(s, saved)
    attach_teacher_samples(s, progress, log)  # before load_teacher: needs the original UNet
    if held_data is not None:
        attach_heldout(s, held_data, log)
    load_teacher(s)
    return s


def start_from(student, folder: Path, c: DistillConfig) -> None:
    """Copy a saved student's weights (a phase-N/ folder or an exported student of this teacher) into `student`,
    after checking that its guidance embedding takes what this run gives it."""
    init, meta = load_student(folder)
    per_frame = bool(meta["guidance_embedding"].get("per_frame", False))
    if per_frame != (c.guidance_input == "frame"):
        raise AnimateError(f"--init-student {folder}: its guidance embedding takes "
                           f"{'each frame' if per_frame else 'the video'}'s scale; give --guidance-input "
                           f"{'frame' if per_frame else 'video'}, or another student")
    try:
        student.load_state_dict(init.state_dict(), strict=True)
    except RuntimeError as e:
        raise AnimateError(f"--init-student {folder}: not a student of this teacher ({first_line(e)})") from None


def load_teacher(s: Session) -> None:
    """Phase 0, and every round with round_target "teacher": the original UNet; phase r: the student that phase
    r - 1 saved (frozen, in the teacher dtype); stage 3: none (its targets are the teacher's samples)."""
    if s.done:
        s.teacher = None
    elif s.config.is_match(s.phase):
        s.teacher, s.base_unet = None, None
    elif s.phase == 0 or s.config.round_target == "teacher":
        s.teacher = s.base_unet
    elif s.config.round_target == "trajectory":  # the targets are the teacher's kept paths
        s.teacher, s.base_unet = None, None
    else:
        s.teacher, _ = load_student(phase_folder(s.workdir, s.phase - 1), s.teacher_dtype, s.device)
        s.base_unet = None  # not needed any more


# may change for phases not yet finished:
PER_PHASE = ("stage1_steps", "round_steps", "match_steps", "match_lr", "match_loss", "match_metric")
ANY_TIME = ("precision", "gradient_checkpointing",  # how it runs, not what is learned: may change on any resume
            "eval_every", "keep_best")  # (and how often it is measured, and which measured student a phase keeps)


def merge_config(saved: DistillConfig, options: dict, phase: int) -> DistillConfig:
    """The checkpoint's config; a resumed run may change only the step counts (and stage 3's rate and loss) of
    phases not yet finished: a finished run given --match-steps goes on to stage 3."""
    import dataclasses

    changes = {}
    for name, new in options.items():
        old = getattr(saved, name)
        if isinstance(old, tuple):
            new = tuple(new)
        if new == old:
            continue
        if name in ANY_TIME:
            changes[name] = new
            continue
        if name not in PER_PHASE:
            raise AnimateError(f"{flag(name)} {new} differs from the run in this workdir ({old}); "
                               "use another --workdir to start over")
        finished = phase > {"stage1_steps": 0, "round_steps": saved.rounds}.get(name, saved.rounds + 1)
        if finished:
            raise AnimateError(f"{flag(name)}: its phase is finished in this workdir (was {old}); "
                               "use another --workdir to start over")
        changes[name] = new
    return dataclasses.replace(saved, **changes)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- checkpoints
def checkpoint_path(workdir: Path) -> Path:
    return Path(workdir) / CHECKPOINT


def load_checkpoint_data(workdir: Path) -> dict | None:
    path = checkpoint_path(workdir)
    if not path.is_file():
        return None
    return load_checkpoint_file(path)


def save_checkpoint(s: Session) -> Path:
    path = checkpoint_path(s.workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if s.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(s.device)
    data = {
        "config": asdict(s.config),
        "images": s.data.names,
        "phase": s.phase,
        "step": s.step,
        "global_step": s.global_step,
        "last_loss": s.last_loss,
        "student": s.student.state_dict(),
        "optimizer": s.optimizer.state_dict() if s.optimizer is not None else None,
        "ema": s.ema,
        "rng": rng,
    }
    save_checkpoint_file(path, data)  # atomic: a crash mid-save leaves the previous checkpoint intact
    return path


def restore(s: Session, data: dict) -> None:
    s.phase, s.step, s.global_step = data["phase"], data["step"], data["global_step"]
    s.last_loss = data.get("last_loss")
    s.student.load_state_dict(data["student"], strict=True)
    if data.get("optimizer") is not None:
        s.optimizer.load_state_dict(data["optimizer"])
    if data.get("ema") is not None:
        s.ema = {k: v.to(s.device) for k, v in data["ema"].items()}
    torch.set_rng_state(data["rng"]["torch"])
    if "cuda" in data["rng"] and s.device.type == "cuda":
        torch.cuda.set_rng_state(data["rng"]["cuda"], s.device)
    trim_loss_log(s.workdir, s.global_step)
    trim_loss_log(s.workdir, s.global_step, EVAL_LOG)
    s.extras["best"] = phase_best(s.workdir, s.phase, s.global_step)


def trim_loss_log(workdir: Path, global_step: int, name: str = LOSS_LOG) -> None:
    """Drop loss (or eval) lines past the checkpoint: they will be written again by the resumed run."""
    path = Path(workdir) / name
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= global_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept))


# ---------------------------------------------------------------- weight averaging
def ema_decay(c: DistillConfig, step: int) -> float:
    """The decay of the average at the phase's `step`-th update (1-based): c.ema, warmed up as (1 + step) /
    (10 + step), so that a phase's first updates do not keep it near the weights the phase started with."""
    return min(c.ema, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(s: Session) -> None:
    """After an optimizer step: fold the student's weights into the phase's average (started, at the phase's
    first step, from the weights before it)."""
    decay = ema_decay(s.config, s.step)
    for name, value in s.student.state_dict().items():
        average = s.ema[name]
        if average.is_floating_point():
            average.lerp_(value.detach().float(), 1.0 - decay)
        else:
            average.copy_(value)


@contextlib.contextmanager
def averaged(s: Session):
    """The student holds the phase's averaged weights inside the block, its own after it (nothing to do without
    an average)."""
    if s.ema is None:
        yield
        return
    live = {k: v.detach().clone() for k, v in s.student.state_dict().items()}
    s.student.load_state_dict(s.ema, strict=True)
    try:
        yield
    finally:
        s.student.load_state_dict(live, strict=True)


# ---------------------------------------------------------------- training
def train_step(s: Session, batch: Batch | None = None) -> float:
    """One optimizer step on `batch` (default: the step's own batch); advances the counters."""
    c = s.config
    if batch is None:
        if c.is_match(s.phase):
            batch = draw_match_batch(c, s.data, s.sigmas, s.global_step + 1, s.device)
        elif s.phase > 0 and c.round_target == "trajectory":
            batch = draw_path_batch(c, s.data, s.sigmas, s.global_step + 1, s.device, s.phase)
        else:
            batch = draw_batch(c, s.data, s.sigmas, s.global_step + 1, s.device, s.phase)
    if c.ema > 0 and s.ema is None:  # the phase's first step
        s.ema = {k: v.detach().float().clone() for k, v in s.student.state_dict().items()}
    s.student.train()
    loss = batch_loss(s, batch)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if c.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.student.parameters(), c.grad_clip)
    factor = lr_factor(c, s.phase, s.step)
    lr = c.phase_lr(s.phase)
    for group, base in zip(s.optimizer.param_groups, (lr, lr * c.guidance_lr_mult), strict=True):
        group["lr"] = base * factor
    s.optimizer.step()
    s.step += 1
    s.global_step += 1
    if s.ema is not None:
        update_ema(s)
    s.last_loss = loss.item()
    s.extras["last_batch"] = {"sigma": batch.sigma.mean().item(), "w": batch.w.mean().item()}
    return s.last_loss


def lr_factor(c: DistillConfig, phase: int, step: int) -> float:
    """The learning rate of step `step` (0-based, within the phase) over the base rate: rising linearly over the
    phase's first warmup share of steps (Adam's first steps, from fresh moments, move every weight by about the
    full rate whatever its gradient), then constant or annealed linearly to zero, and zero past the phase's end."""
    n = max(c.phase_steps(phase), 1)
    ramp = min(1.0, (step + 1) / max(round(c.warmup * n), 1))
    if c.lr_schedule == "constant":
        return ramp
    return ramp * max(0.0, 1.0 - step / n)


def sampler_config(s: Session, phase: int) -> dict:
    """What student.json records for the student at the end of `phase` (read by a preset)."""
    c = s.config
    steps = c.student_steps(phase)
    return {
        "steps": steps,
        "sampler": FINAL_SAMPLER,
        "sigmas": [float(x) for x in grid(c, s.scheduler_config, steps)],
        "schedule": {"name": c.schedule, "base_steps": c.base_steps, "stride": c.base_steps // steps,
                     **s.scheduler_config},
        "guidance": {"embedding_input": "frame_scale" if c.guidance_input == "frame" else "max_guidance",
                     "min_guidance": c.min_guidance,
                     "max_guidance_range": list(c.guidance_range), "passes": 1},
        "conditioning": {"fps": c.fps, "motion": c.motion, "noise_aug": c.noise_aug, "frames": c.frames,
                         "width": c.width, "height": c.height},
        "teacher": s.extras.get("model_source", c.model),
        "distillation": {"phase": phase, "stage1_steps": c.stage1_steps, "round_steps": c.round_steps,
                         "rounds": c.rounds, "step_factor": c.step_factor, "round_target": c.round_target,
                         "batch_size": c.batch_size, "lr": c.lr, "lr_schedule": c.lr_schedule,
                         "sigma_sampling": sampling_record(c, c.sigma_sampling),
                         "round_sigma_sampling": sampling_record(c, c.round_sigma_sampling),
                         "precision": c.precision, "images": len(s.data.names), "data": c.data,
                         "samples_per_image": c.samples_per_image if c.data == "teacher" else None,
                         "match_steps": c.match_steps, "match_lr": c.match_lr if c.match_steps else None,
                         "match_loss": c.match_loss if c.match_steps else None,
                         "match_metric": c.match_metric if c.match_steps else None,
                         "ema": c.ema, "warmup": c.warmup, "init_student": c.init_student,
                         "global_step": s.global_step},
    }


def sampling_record(c: DistillConfig, sampling: str):
    return sampling if sampling == "uniform" else {"lognormal": [c.sigma_log_mean, c.sigma_log_std],
                                                   "uniform_share": UNIFORM_SHARE}


def end_phase(s: Session, log) -> None:
    if s.ema is not None:  # the phase ends with its average
        s.student.load_state_dict(s.ema, strict=True)
        s.ema = None
    if s.heldout is not None:
        check_heldout(s, log)
        if s.config.keep_best:
            restore_best(s, log)
    folder = save_student(s.student, phase_folder(s.workdir, s.phase), sampler_config(s, s.phase))
    log(f"{phase_name(s.config, s.phase)} done at step {s.global_step}: saved {folder}")
    shutil.rmtree(best_folder(s.workdir, s.phase), ignore_errors=True)
    s.extras["best"] = None
    s.phase += 1
    s.step = 0
    s.optimizer = new_optimizer(s.config, s.student)
    save_checkpoint(s)
    load_teacher(s)


def run(s: Session, checkpoint_every: int = 100, log_every: int = 10, log=print, progress=None,
        until: int | None = None, step_lines: bool = True) -> Session:
    """Train every phase to its end (or until global step `until`), checkpointing as it goes. `log` gets phase
    events, and a loss line every `log_every` steps when `step_lines`; `progress(name, step, total, loss=None)`
    follows every step."""
    loss_file = (s.workdir / LOSS_LOG).open("a")
    start, start_step, recent = time.perf_counter(), s.global_step, []  # the rate: since the last loss line
    try:
        while not s.done and (until is None or s.global_step < until):
            c = s.config
            total = c.phase_steps(s.phase)
            if s.step >= total:
                end_phase(s, log)
                continue
            if s.heldout is not None and s.step == 0 and s.extras.get("best") is None:
                check_heldout(s, log)  # where the phase starts: a candidate for keep_best too
            if progress is not None:
                progress(phase_name(c, s.phase), s.step, total)
            loss = train_step(s)
            recent.append(loss)
            extra = s.extras["last_batch"]
            loss_file.write(json.dumps({"global_step": s.global_step, "phase": s.phase,
                                        "stage": stage_number(c, s.phase), "round": s.phase, "step": s.step,
                                        "loss": loss, "sigma": extra["sigma"], "w": extra["w"],
                                        "lr": c.phase_lr(s.phase) * lr_factor(c, s.phase, s.step - 1),
                                        "time": round(time.time(), 3)}) + "\n")
            loss_file.flush()
            if progress is not None:
                progress(phase_name(c, s.phase), s.step, total, loss)
            if step_lines and (s.step % log_every == 0 or s.step == total):
                now = time.perf_counter()
                rate = (s.global_step - start_step) / max(now - start, 1e-9)
                start, start_step = now, s.global_step
                log(f"{phase_name(c, s.phase)}: step {s.step}/{total} loss {sum(recent) / len(recent):.5f} "
                    f"({rate:.2f} steps/s)")
                recent = []
            if c.eval_every and s.heldout is not None and s.step % c.eval_every == 0 and s.step < total:
                check_heldout(s, log)
            if s.global_step % checkpoint_every == 0:
                save_checkpoint(s)
    finally:
        loss_file.close()
    save_checkpoint(s)
    return s


def export(s: Session, folder: Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """The final student (the last phase's) as a student folder a preset reads."""
    if not s.done:
        raise AnimateError(f"nothing to export yet: the run is in {phase_name(s.config, s.phase)}")
    return save_student(s.student, folder, sampler_config(s, s.config.last_phase), dtype=dtype)
