"""From a preset and the command line to a loaded model and resolved settings; shared by every command."""

import secrets

import torch

from animate_cli.errors import AnimateError
from animate_cli.models import Model, load_model
from animate_cli.optimize import apply_optimizations
from animate_cli.pipeline import DTYPES, Settings
from animate_cli.preset import Preset, apply_settings, check_value, load_preset
from animate_cli.student import attach_student, check_student_guidance


def resolve_preset(name: str, sets: list[str] | None, **flags) -> Preset:
    """The preset, then --set FIELD=VALUE, then the dedicated flags (--frames, --steps, ...) that were given."""
    preset = apply_settings(load_preset(name), sets or [])
    given = {k: check_value(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None}
    return preset.replace(**given) if given else preset


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AnimateError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnimateError(f"--device {name}: this torch build sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise AnimateError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def configure_backends(preset: Preset) -> None:
    """TF32 on or off as the preset says (the fp32 reference keeps it off)."""
    torch.backends.cuda.matmul.allow_tf32 = preset.tf32
    torch.backends.cudnn.allow_tf32 = preset.tf32


def open_model(spec: str, preset: Preset, device: torch.device, progress: bool = True,
               compile_backend: str = "inductor") -> Model:
    """The model with the preset's precision and speed switches applied; a distilled student refuses a max
    guidance it was not distilled for."""
    configure_backends(preset)
    model = load_model(spec, DTYPES[preset.dtype], device, progress=progress)
    if preset.student:
        attach_student(model, preset.student, DTYPES[preset.dtype], device)
        check_student_guidance(model, preset.max_guidance)  # before any work: one line, nothing written
    apply_optimizations(model, preset, backend=compile_backend)
    return model


def settings_for(preset: Preset, model: Model, width: int, height: int) -> Settings:
    frames = model.frames if preset.frames == "auto" else preset.frames
    return Settings(
        width=width,
        height=height,
        frames=frames,
        steps=preset.steps,
        fps=preset.fps,
        motion=preset.motion,
        noise_aug=preset.noise_aug,
        min_guidance=preset.min_guidance,
        max_guidance=preset.max_guidance,
        decode_chunk=min(preset.decode_chunk, frames),
        sampler=preset.sampler,
        schedule=preset.schedule,
    )


def draw_seed() -> int:
    return secrets.randbelow(2**31)
