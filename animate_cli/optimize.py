"""A preset's speed switches, applied from outside the stock diffusers modules; each one can be left off.

attention = "project_once": cross-attention K/V projected once per video (animate_cli.attention).
time_conv = "conv2d" | "channels_last": the temporal layers' k x 1 x 1 Conv3d as 2D convolutions, or in
channels-last-3d memory (animate_cli.time_conv).
compile = true: torch.compile of the UNet and the VAE decoder, static shapes, no CUDA graphs
(diffusers issue 10317: a CUDA-graphed SVD UNet breaks on the second image), artifacts cached on disk.
"""

import os
import warnings
from pathlib import Path

import torch

from animate_cli.attention import apply_project_once_attention
from animate_cli.models import Model
from animate_cli.preset import Preset
from animate_cli.time_conv import apply_channels_last, apply_time_conv


def apply_optimizations(model: Model, preset: Preset, backend: str = "inductor") -> None:
    if preset.attention == "project_once":
        model.extras["project_once_modules"] = apply_project_once_attention(model.unet)
    if preset.time_conv != "conv3d":
        apply = apply_time_conv if preset.time_conv == "conv2d" else apply_channels_last
        model.extras["time_conv_modules"] = apply(model.unet) + apply(model.vae)
    if preset.compile:
        compile_model(model, backend)


def cache_dir() -> Path:
    base = os.environ.get("ANIMATE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "animate"
    return Path(base)


def compile_model(model: Model, backend: str = "inductor") -> None:
    """Compile in place (module.compile keeps the module, its config and its state dict keys)."""
    if backend == "inductor":
        # Inductor's on-disk caches under the user's cache folder, so a second process starts warm.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        load_compile_cache(model.device)
    # diffusers' lru_cache-wrapped version checks are traced through, harmlessly; keep the console clean.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    # mode=None: inductor's default, which uses no CUDA graphs; dynamic=False: one graph per shape.
    model.unet.compile(backend=backend, dynamic=False)
    model.vae.decoder.compile(backend=backend, dynamic=False)
    model.extras["compiled"] = backend
    model.extras["warm_shapes"] = set()


def artifacts_file(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    return cache_dir() / f"compile-artifacts-torch{torch.__version__}-{name}.bin"


def load_compile_cache(device: torch.device) -> bool:
    path = artifacts_file(device)
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception:  # a stale or torn cache only costs a recompile
        return False
    return True


def save_compile_cache(device: torch.device) -> Path | None:
    """Everything compiled so far in this process, for the next one; written atomically."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return None
    path = artifacts_file(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(artifacts[0])
    os.replace(tmp, path)
    return path
