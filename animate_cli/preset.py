"""Presets: one dataclass, one TOML file per preset in presets/, a loader that names the bad field."""

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from animate_cli.errors import AnimateError

# Field -> allowed values, for the fields that take one of a few words.
CHOICES = {
    "dtype": ("float32", "bfloat16", "float16"),
    "sampler": ("euler", "dpmpp_2m", "heun", "animatelcm"),
    "schedule": ("karras", "log_sigma", "student", "animatelcm"),
    "attention": ("stock", "project_once"),
    "time_conv": ("conv3d", "conv2d", "channels_last"),
}
# Field -> (low, high) inclusive, for numbers.
RANGES = {
    "steps": (1, 1000),
    "fps": (1, 120),
    "motion": (1, 255),
    "noise_aug": (0.0, 10.0),
    "min_guidance": (0.0, 100.0),
    "max_guidance": (0.0, 100.0),
    "decode_chunk": (1, 1000),
    "frames": (1, 1000),
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dtype: str = "bfloat16"
    tf32: bool = False  # float32 matmuls on TensorFloat-32 tensor cores (CUDA only)
    sampler: str = "euler"
    schedule: str = "karras"  # how sigmas are spaced between sigma_max and sigma_min
    steps: int = 25
    min_guidance: float = 1.0  # classifier-free guidance scale on the first frame ...
    max_guidance: float = 3.0  # ... rising linearly to this on the last (SVD's scheme)
    frames: int | str = "auto"  # "auto": the model's native count (25 for SVD-XT)
    fps: int = 7
    motion: int = 127  # SVD motion bucket id
    noise_aug: float = 0.02  # noise added to the conditioning image
    decode_chunk: int = 8  # frames per VAE decoder call
    attention: str = "stock"  # "project_once": cross-attention K/V once per video, not once per copy
    time_conv: str = "conv3d"  # the temporal layers' k x 1 x 1 Conv3d: as shipped, as 2D convolutions ("conv2d",
    # slower on an H200, eager: README) or in channels-last-3d memory ("channels_last"); no preset changes it
    compile: bool = False  # torch.compile the UNet and the VAE decoder
    student: str = ""  # "": the model's own UNet; "auto", a student folder, or AnimateLCM .safetensors weights

    def replace(self, **changes: Any) -> "Preset":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(Preset)}


def preset_dir():
    return packaged_folder("presets")


def packaged_folder(name: str):
    """animate_cli.NAME as installed (pyproject maps it from the top-level folder NAME/), or that folder of the
    source tree when the package runs from a checkout that was not installed (PYTHONPATH=checkout)."""
    try:
        return resources.files(f"animate_cli.{name}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / name


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in preset_dir().iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (presets/NAME.toml) or by path to a TOML file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise AnimateError(f"preset file {path} not found")
        text, where = path.read_text(), str(path)
    else:
        resource = preset_dir() / f"{name_or_path}.toml"
        if not resource.is_file():
            raise AnimateError(
                f"unknown preset {name_or_path!r}: choose one of {', '.join(preset_names())} or give a .toml file"
            )
        text, where = resource.read_text(), f"presets/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AnimateError(f"{where}: not valid TOML ({e})") from None
    data.setdefault("name", Path(where).stem)
    data.setdefault("description", "")
    return build_preset(data, where)


def build_preset(data: dict[str, Any], where: str) -> Preset:
    missing = [n for n in FIELDS if n not in data]
    if missing:
        raise AnimateError(f"{where}: missing field {missing[0]!r}; a preset file names every field")
    return Preset(**{key: check_value(key, value, where) for key, value in data.items()})


def check_value(key: str, value: Any, where: str) -> Any:
    """The value if it suits the field, else an error naming the file and the field."""
    if key not in FIELDS:
        raise AnimateError(f"{where}: unknown field {key!r}; known fields: {', '.join(FIELDS)}")
    if key == "frames" and value == "auto":
        return value
    default = FIELDS[key].default
    expected = str if default is dataclasses.MISSING else int if key == "frames" else type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise AnimateError(f"{where}: field {key!r} must be {expected.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise AnimateError(f"{where}: field {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RANGES:
        low, high = RANGES[key]
        if not low <= value <= high:
            raise AnimateError(f"{where}: field {key!r} must be between {low} and {high}, got {value!r}")
    return value


def parse_setting(text: str) -> tuple[str, Any]:
    """'FIELD=VALUE' from --set, the value read as TOML (so 'steps=8', 'tf32=true', 'sampler=euler')."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AnimateError(f"--set {text!r}: expected FIELD=VALUE, for example --set steps=15")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: sampler=euler
    return key, value


def apply_settings(preset: Preset, settings: list[str]) -> Preset:
    changes = dict(parse_setting(s) for s in settings)
    checked = {k: check_value(k, v, "--set") for k, v in changes.items()}
    if "name" in checked:
        raise AnimateError("--set: the field 'name' cannot be changed; copy the preset file instead")
    return preset.replace(**checked) if checked else preset
