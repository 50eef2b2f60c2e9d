"""Model loading: a hub id, a local folder in diffusers layout, or `random:NAME` from configs in the package.

Weights are read from safetensors only; no remote code is ever run.
"""

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

try:  # transformers 5 names the processor that needs no torchvision this way
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

from animate_cli.errors import AnimateError

COMPONENTS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")
SVD_NATIVE = {"native_size": [1024, 576]}  # when a folder does not say otherwise; frames: the UNet's num_frames
WEIGHTS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("image_encoder", "model"))


@dataclass
class Model:
    source: str  # what the user named
    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor
    scheduler_config: dict
    native_size: tuple[int, int]  # (width, height), landscape
    frames: int
    random_weights: bool
    revision: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must divide by this: the VAE's and the UNet's downsampling together (64 for SVD)."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def random_names() -> list[str]:
    return sorted(p.name for p in resources.files("animate_cli.configs").iterdir() if p.is_dir()
                  and not p.name.startswith("_"))


def load_model(spec: str, dtype: torch.dtype, device: torch.device, progress: bool = True) -> Model:
    if spec.startswith("random:"):
        return build_random(spec.removeprefix("random:"), dtype, device)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return load_folder(path, spec, dtype, device)
    packaged = packaged_model(spec)
    if packaged is not None:  # a model shipped inside the package (animate_cli/weights/NAME): no network
        return load_folder(packaged, spec, dtype, device)
    folder = download(spec, want_variant=dtype != torch.float32, progress=progress)
    return load_folder(folder, spec, dtype, device)


def packaged_names() -> list[str]:
    """Models shipped as package data under animate_cli/weights/ (diffusers layout), e.g. tiny-motion."""
    try:
        root = resources.files("animate_cli.weights")
    except ModuleNotFoundError:
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "model_index.json").is_file())


def packaged_model(name: str) -> Path | None:
    """The folder of the packaged model `name`, or None."""
    return Path(str(resources.files("animate_cli.weights") / name)) if name in packaged_names() else None


def build_random(name: str, dtype: torch.dtype, device: torch.device) -> Model:
    """An architecture from shipped configs, with random weights (seed 0): noise out, real cost in."""
    if name not in random_names():
        raise AnimateError(f"unknown random model {name!r}: choose one of {', '.join(random_names())}")
    folder = resources.files("animate_cli.configs") / name

    def config(part: str) -> dict:
        return json.loads((folder / f"{part}.json").read_text())

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: no float32 copy of 1.5 B parameters
    try:
        with torch.device(device):  # initialised where it will run: seconds on a GPU, not minutes
            unet = UNetSpatioTemporalConditionModel.from_config(config("unet"))
            vae = AutoencoderKLTemporalDecoder.from_config(config("vae"))
            clip_config = {k: v for k, v in config("image_encoder").items()
                           if k not in ("architectures", "model_type")}
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config))
    finally:
        torch.set_default_dtype(default_dtype)
    meta = config("animate")
    return Model(
        source=f"random:{name}",
        unet=prepare(unet, dtype, device),
        vae=prepare(vae, dtype, device),
        image_encoder=prepare(image_encoder, dtype, device),
        feature_extractor=CLIPImageProcessor(**config("feature_extractor")),
        scheduler_config=config("scheduler"),
        native_size=tuple(meta["native_size"]),
        frames=meta["frames"],
        random_weights=True,
    )


def prepare(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def quiet_load() -> dict:
    """from_pretrained keywords for diffusers models: without accelerate (not a dependency), ask for the plain load
    it falls back to anyway, so it does not print a suggestion to install accelerate on every run."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def load_folder(path: Path, spec: str, dtype: torch.dtype, device: torch.device) -> Model:
    """A folder in diffusers layout (model_index.json, unet/, vae/, image_encoder/, ...)."""
    if not path.is_dir():
        raise AnimateError(f"model folder {spec} not found")
    missing = [part for part in ("model_index.json", *COMPONENTS) if not (path / part).exists()]
    if missing:
        raise AnimateError(
            f"{spec} is not a Stable Video Diffusion folder in diffusers layout (no {missing[0]}); "
            "save one with StableVideoDiffusionPipeline.save_pretrained"
        )
    # fp16 files for half precision when there are some; for float32 the full files, else the fp16 ones upcast
    plain = all((path / part / f"{stem}.safetensors").is_file() for part, stem in WEIGHTS)
    variant = "fp16" if has_variant(path, "fp16") and (dtype != torch.float32 or not plain) else None
    for part, stem in WEIGHTS:
        name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
        if not (path / part / name).is_file():
            raise AnimateError(f"{spec}: {part}/{name} is missing; only safetensors weights are loaded")
    common = dict(torch_dtype=dtype, variant=variant, use_safetensors=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per local load is noise; downloads have their own
    quiet = quiet_load()
    unet = UNetSpatioTemporalConditionModel.from_pretrained(path, subfolder="unet", **common, **quiet)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(path, subfolder="vae", **common, **quiet)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder", **common)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    meta_file = path / "animate.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else SVD_NATIVE
    return Model(
        source=spec,
        unet=prepare(unet, dtype, device),
        vae=prepare(vae, dtype, device),
        image_encoder=prepare(image_encoder, dtype, device),
        feature_extractor=CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor"),
        scheduler_config=scheduler_config,
        native_size=tuple(meta["native_size"]),
        frames=meta.get("frames", unet.config.num_frames),
        random_weights=False,
        revision=path.name if "snapshots" in path.parts else None,
        extras={"folder": str(path)},
    )


def has_variant(path: Path, variant: str) -> bool:
    return all(any((path / part).glob(f"*.{variant}.safetensors")) for part in ("unet", "vae", "image_encoder"))


def download(repo_id: str, want_variant: bool, progress: bool) -> Path:
    """The repo's safetensors weights and configs in the local cache; downloads what is missing."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if repo_id.count("/") != 1:
        raise AnimateError(f"--model {repo_id}: not a folder, a hub id (owner/name) or random:NAME")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        if offline:
            files = [str(p.relative_to(d)) for d in [Path(snapshot_download(repo_id, local_files_only=True))]
                     for p in d.rglob("*")]
        else:
            files = HfApi().list_repo_files(repo_id)
        variant = "fp16" if want_variant and any(f.endswith(".fp16.safetensors") for f in files) else None
        weights = [f"*/*.{variant}.safetensors"] if variant else [
            "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", *weights],
                                   local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        raise AnimateError(
            f"model {repo_id} is not in the local cache and the hub is offline: run once with network "
            "(unset HF_HUB_OFFLINE), or pass a local folder or random:tiny to --model"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise AnimateError(
            f"model {repo_id} was not found on the hub or needs access: check the id, "
            "or log in with `hf auth login` after accepting its licence"
        ) from None
    except HfHubHTTPError as e:
        raise AnimateError(f"could not download {repo_id}: {e}") from None
    return Path(folder)
