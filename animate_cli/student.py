"""A guidance-conditioned student of SVD's UNet, built from outside the stock diffusers module.

SVD's UNet forms its conditioning vector as  emb = time_embedding(t) + add_embedding(time_ids)  ([B, D]) and
repeats it per frame. The student replaces `unet.add_embedding` with `GuidedAddEmbedding`, whose forward is

    add_embedding(time_ids) + mlp(features(w))

with w the guidance scale of each video ([B], set for the call with `set_guidance`), features(w) sinusoidal
(as a timestep embedding of `GUIDANCE_SCALE * w`) and mlp = Linear -> SiLU -> Linear whose LAST layer starts at
zero: an untrained student returns exactly the teacher's output, for any w. Nothing else in the UNet changes,
so its stock part saves and loads with diffusers' own save_pretrained / from_pretrained.

Per frame (per_frame = True): SVD guides each frame with its own scale, rising linearly from min_guidance on
the first frame to w on the last, and the UNet repeats its embedding for every frame. A per-frame student adds
mlp(features(scale of frame f)) to each frame's copy instead: forward pre-hooks on the UNet's down, mid and up
blocks add it to their `temb` argument ([B * F, D]; B and F read from `image_only_indicator`), and
add_embedding adds nothing. The same zero-initialised MLP, so the untrained student is the teacher here too.

Student folder (save_student / load_student), safetensors and json only:
    folder/unet/config.json, folder/unet/diffusion_pytorch_model.safetensors   the stock UNet part
    folder/guidance_embedding.safetensors                                       the guidance MLP
    folder/student.json                                                         kind, sampler config, guidance
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from animate_cli.errors import AnimateError
from animate_cli.sampling import svd_preconditioning

KIND = "guidance-distilled"
GUIDANCE_FILE = "guidance_embedding.safetensors"
STUDENT_FILE = "student.json"
FEATURES = 256  # sinusoidal features of w
GUIDANCE_SCALE = 100.0  # w is multiplied by this before the sinusoids: 0.01 of guidance turns the fastest by 1 rad


def guidance_features(w: torch.Tensor, dim: int = FEATURES, scale: float = GUIDANCE_SCALE) -> torch.Tensor:
    """[B] -> [B, dim] float32: cos and sin of scale * w at frequencies 1 .. 1e-4 (geometric)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / half)
    args = (w.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GuidedAddEmbedding(nn.Module):
    """`orig(time_ids) + mlp(features(w))`; w [B] (or [1], broadcast) is set per call through `self.w`. With
    per_frame, `orig(time_ids)` alone: the blocks' FrameGuidance hooks add mlp(features(frame scale))."""

    def __init__(self, orig: nn.Module, embed_dim: int, features: int = FEATURES, hidden: int | None = None,
                 scale: float = GUIDANCE_SCALE, per_frame: bool = False, min_guidance: float = 1.0):
        super().__init__()
        self.orig = orig
        self.features, self.scale = features, scale
        self.per_frame, self.min_guidance = per_frame, float(min_guidance)
        hidden = hidden or embed_dim
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.mlp[2].weight)  # zero-initialised: the untrained student is the teacher, exactly
        nn.init.zeros_(self.mlp[2].bias)
        self.w: torch.Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.mlp[0].out_features

    def guidance(self, batch: int, device) -> torch.Tensor:
        """w for each of `batch` videos: [batch]."""
        if self.w is None:
            raise RuntimeError("guidance-distilled UNet called without a guidance scale: call set_guidance first")
        w = self.w.to(device).reshape(-1)
        if w.shape[0] not in (1, batch):
            raise RuntimeError(f"guidance scale for {w.shape[0]} videos, but the UNet call has {batch}")
        return w.expand(batch)

    def embed(self, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        features = guidance_features(scales, self.features, self.scale).to(self.mlp[0].weight.dtype)
        return self.mlp(features).to(dtype)

    def forward(self, time_embeds: torch.Tensor) -> torch.Tensor:
        base = self.orig(time_embeds)  # [B, D]
        w = self.guidance(base.shape[0], base.device)
        if self.per_frame:
            return base
        return base + self.embed(w, base.dtype)

    def frame_term(self, batch: int, frames: int, dtype, device) -> torch.Tensor:
        """[batch * frames, D]: the embedding of each frame's scale, min_guidance (first) -> w (last)."""
        w = self.guidance(batch, device)
        ramp = torch.linspace(0, 1, frames, device=device)
        scales = self.min_guidance + (w[:, None] - self.min_guidance) * ramp[None]
        return self.embed(scales.reshape(-1), dtype)

    def config(self) -> dict:
        return {"features": self.features, "hidden": self.hidden, "scale": self.scale,
                "embed_dim": self.mlp[2].out_features, "per_frame": self.per_frame,
                "min_guidance": self.min_guidance}


class FrameGuidance:
    """Forward pre-hook (with kwargs) of a UNet block: temb += the per-frame guidance term. A callable object
    rather than a closure, so that deep-copying the UNet points the copy's hooks at the copy's embedding."""

    def __init__(self, embedding: GuidedAddEmbedding):
        self.embedding = embedding

    def __call__(self, module, args, kwargs):
        temb, indicator = kwargs["temb"], kwargs["image_only_indicator"]
        batch, frames = indicator.shape
        term = self.embedding.frame_term(batch, frames, temb.dtype, temb.device)
        return args, {**kwargs, "temb": temb + term}


def guided_blocks(unet) -> list[nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def hook_frames(unet, embedding: GuidedAddEmbedding) -> None:
    for block in guided_blocks(unet):
        block.register_forward_pre_hook(FrameGuidance(embedding), with_kwargs=True)


def guided_embedding(unet) -> GuidedAddEmbedding:
    module = getattr(unet, "add_embedding", None)
    if not isinstance(module, GuidedAddEmbedding):
        raise AnimateError("this UNet is not a guidance-distilled student (no guidance embedding)")
    return module


def is_student(unet) -> bool:
    return isinstance(getattr(unet, "add_embedding", None), GuidedAddEmbedding)


def make_student(teacher_unet, hidden: int | None = None, per_frame: bool = False,
                 min_guidance: float = 1.0, seed: int | None = None) -> nn.Module:
    """A deep copy of `teacher_unet` with a zero-initialised guidance embedding on its add_embedding (and, per
    frame, the blocks' hooks that add it to each frame). With `seed`, the embedding's first (random) layer is
    drawn from it rather than from torch's global generator, which is left as it was."""
    if is_student(teacher_unet):
        raise AnimateError("make_student: the UNet already has a guidance embedding")
    student = copy.deepcopy(teacher_unet)
    orig = student.add_embedding
    embed_dim = orig.linear_2.out_features
    param = next(orig.parameters())
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        wrapper = GuidedAddEmbedding(orig, embed_dim, hidden=hidden, per_frame=per_frame, min_guidance=min_guidance)
    student.add_embedding = wrapper.to(device=param.device, dtype=param.dtype)
    if per_frame:
        hook_frames(student, student.add_embedding)
    return student


def set_guidance(student, w, min_guidance: float | None = None) -> None:
    """The guidance scale of each video in the next UNet calls: Tensor [B] (or a float, for every video); a
    per-frame student ramps from min_guidance (default: the one it was distilled with) to w."""
    module = guided_embedding(student)
    if not isinstance(w, torch.Tensor):
        w = torch.tensor([float(w)])
    module.w = w.detach().reshape(-1).float()
    if min_guidance is not None:
        module.min_guidance = float(min_guidance)


@contextlib.contextmanager
def stock_view(student):
    """The student with its stock add_embedding back in place (for diffusers' save_pretrained)."""
    module = guided_embedding(student)
    student.add_embedding = module.orig
    try:
        yield student
    finally:
        student.add_embedding = module


def save_student(student, folder: Path, sampler_config: dict, dtype: torch.dtype | None = None) -> Path:
    """Write the student in diffusers layout (see the module docstring); `sampler_config` goes to student.json
    (steps, sigmas or schedule, sampler, guidance, teacher id: whatever the caller records)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = guided_embedding(student)
    source = student if dtype is None else nn.Module.to(copy.deepcopy(student), dtype=dtype)  # no diffusers warning
    with stock_view(source):
        source.save_pretrained(folder / "unet", safe_serialization=True)
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in module.mlp.state_dict().items()}
    save_file(tensors, str(folder / GUIDANCE_FILE))
    write_student_config(folder, {"kind": KIND, "guidance_embedding": module.config(), **sampler_config})
    return folder


def write_student_config(folder: Path, meta: dict) -> None:
    """Write FOLDER/student.json (what read_student_config reads)."""
    (Path(folder) / STUDENT_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_student_config(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / STUDENT_FILE
    if not path.is_file():
        raise AnimateError(f"{folder} is not a distilled student folder (no {STUDENT_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnimateError(f"{path}: not valid JSON ({e})") from None
    if meta.get("kind") != KIND:
        raise AnimateError(f"{path}: kind {meta.get('kind')!r}, expected {KIND!r}")
    return meta


def load_student(folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(student UNet, its student.json as a dict) from a folder written by save_student."""
    from diffusers import UNetSpatioTemporalConditionModel
    from safetensors.torch import load_file

    from animate_cli.models import quiet_load

    folder = Path(folder)
    meta = read_student_config(folder)
    for need in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", GUIDANCE_FILE):
        if not (folder / need).is_file():
            raise AnimateError(f"{folder}: {need} is missing; a student folder holds safetensors weights only")
    unet = UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, use_safetensors=True,
                                                            **quiet_load())
    cfg = meta["guidance_embedding"]
    wrapper = GuidedAddEmbedding(unet.add_embedding, cfg["embed_dim"], features=cfg["features"],
                                 hidden=cfg["hidden"], scale=cfg["scale"], per_frame=cfg.get("per_frame", False),
                                 min_guidance=cfg.get("min_guidance", 1.0))
    try:
        wrapper.mlp.load_state_dict(load_file(str(folder / GUIDANCE_FILE)), strict=True)
    except RuntimeError as e:
        raise AnimateError(f"{folder / GUIDANCE_FILE}: does not match student.json ({first_line(e)})") from None
    unet.add_embedding = wrapper.to(dtype)
    if wrapper.per_frame:
        hook_frames(unet, unet.add_embedding)
    return unet.to(device).eval().requires_grad_(False), meta


def load_animatelcm_unet(path: Path, base_unet):
    """A copy of `base_unet` (SVD-XT's UNet) with the weights of a published AnimateLCM-SVD-xt UNet state dict
    (a safetensors file in diffusers' UNet key names), checked key by key and shape by shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AnimateError(f"AnimateLCM weights {path} not found")
    if path.suffix != ".safetensors":
        raise AnimateError(f"{path}: only .safetensors weights are loaded")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AnimateError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if is_student(base_unet):
        raise AnimateError("load_animatelcm_unet: the base UNet must be a stock SVD UNet, not a student")
    expected = base_unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise AnimateError(f"{path} is not an SVD-XT UNet state dict in diffusers key names: "
                           f"{' and '.join(parts)} keys")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise AnimateError(f"{path}: {len(wrong)} tensors have the wrong shape for this UNet (e.g. {k}: "
                           f"{tuple(state[k].shape)}, expected {tuple(expected[k].shape)})")
    unet = copy.deepcopy(base_unet)
    unet.load_state_dict(state, strict=True)
    return unet


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def make_student_denoiser(model, cond, settings, timer=None):
    """The EDM denoiser D(x, sigma) -> x0 of a guidance-distilled `model.unet`: ONE pass per call on the
    conditional inputs only (batch B, no unconditional half), the guidance embedding set to the run's
    max_guidance for every video. The same arguments as animate_cli.pipeline.make_denoiser, so the pipeline can
    pick this one when `is_student(model.unet)`. A per-frame student follows the run's ramp (min_guidance on
    the first frame); a per-video one the ramp it was distilled with (student.json: guidance.min_guidance)."""
    frames, dtype = settings.frames, model.dtype
    latents = cond.image_latents.unsqueeze(1).expand(-1, frames, -1, -1, -1)  # [B, F, C, h, w]
    embeds, time_ids = cond.image_embeds, cond.added_time_ids
    set_guidance(model.unet, torch.full((len(embeds),), float(settings.max_guidance)),  # once per video
                 settings.min_guidance if guided_embedding(model.unet).per_frame else None)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in, c_skip, c_out, c_noise = svd_preconditioning(sigma)
        v = model.unet(torch.cat([(x * c_in).to(dtype), latents], dim=2), c_noise.to(model.device),
                       encoder_hidden_states=embeds, added_time_ids=time_ids, return_dict=False)[0]
        if timer is not None:
            timer.unet_calls += 1
            timer.unet_passes += 1
        return v.float() * c_out + x * c_skip

    return denoise


def check_student_guidance(model, max_guidance: float) -> None:
    """An AnimateError when `model.unet` is a distilled student asked for a max guidance outside the range it was
    distilled on (student.json: guidance.max_guidance_range): its guidance embedding never saw that value, so what
    it would make is not the teacher's guided video."""
    trained = ((model.extras.get("student") or {}).get("guidance") or {}).get("max_guidance_range")
    if not trained:
        return
    lo, hi = float(min(trained)), float(max(trained))
    if lo - 1e-6 <= max_guidance <= hi + 1e-6:
        return
    span = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
    raise AnimateError(f"this student was distilled for max guidance {span}, not {max_guidance:g}: use "
                       f"--set max_guidance={min(max(max_guidance, lo), hi):g}, or a preset without a student (bf16)")


def attach_student(model, spec: str, dtype: torch.dtype, device: torch.device) -> None:
    """Swap `model.unet` for the preset's student. spec: "auto" (the model folder's own student/, or for a
    random-weight model an untrained student: the teacher with a zero guidance embedding, for timing), a
    student folder, or a .safetensors file of AnimateLCM-SVD-xt UNet weights (its own sampler: animatelcm)."""
    if spec == "auto":
        own = model.extras.get("folder")
        if own is not None and (Path(own) / "student" / STUDENT_FILE).is_file():
            spec = str(Path(own) / "student")
        elif model.random_weights:
            model.unet = make_student(model.unet)
            model.extras["student"] = {"kind": KIND, "untrained": True}
            return
        else:
            raise AnimateError(
                f"no distilled student for {model.source}: make one with `animate distill IMAGES_FOLDER --model "
                f"{model.source} --workdir WORK` and pass --set student=WORK/student, or give AnimateLCM-SVD-xt's "
                "UNet weights with --set student=FILE.safetensors --set sampler=animatelcm --set schedule=animatelcm")
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors":
        model.unet = load_animatelcm_unet(path, model.unet)
        model.extras["student"] = {"kind": "animatelcm", "file": str(path)}
        return
    if not path.is_dir():
        raise AnimateError(f"student {spec} not found: give a folder written by `animate distill`, or 'auto'")
    unet, meta = load_student(path, dtype, device)
    check_compatible(unet, model.unet, f"student {spec}")
    model.unet = unet
    model.extras["student"] = meta


def check_compatible(student, base_unet, where: str = "student") -> None:
    """An AnimateError unless `student` has the architecture of `base_unet` (the model it will run with)."""
    skip = ("_name_or_path", "_diffusers_version", "_use_default_values", "_class_name")
    a = {k: v for k, v in dict(student.config).items() if k not in skip}
    b = {k: v for k, v in dict(base_unet.config).items() if k not in skip}
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        k = differ[0]
        raise AnimateError(f"{where} was distilled from another architecture than this model's UNet "
                           f"({k}: {a.get(k)!r} vs {b.get(k)!r})")
