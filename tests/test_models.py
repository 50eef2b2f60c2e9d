"""Model loading: random:NAME from shipped configs, local folders in diffusers layout, the offline hub cache."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, assert_frames_close, assert_user_error, leftovers
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image

from animate_cli.errors import AnimateError
from animate_cli.models import load_model, random_names

CPU = torch.device("cpu")


def test_random_tiny_model():
    model = load_model("random:tiny", torch.float32, CPU)
    assert model.source == "random:tiny" and model.random_weights
    assert model.native_size == (64, 32) and model.frames == 4
    assert model.vae_scale == 2 and model.size_multiple == 4  # 2 VAE levels x 2 UNet levels
    assert model.dtype == torch.float32 and model.device == CPU
    for module in (model.unet, model.vae, model.image_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert model.scheduler_config["sigma_max"] == 700.0


def test_random_weights_are_seeded():
    """The same random model every time (weights drawn after manual_seed(0)), so timings compare like with like."""
    a = load_model("random:tiny", torch.float32, CPU)
    torch.manual_seed(1234)  # whatever the global RNG was doing before
    b = load_model("random:tiny", torch.float32, CPU)
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.image_encoder.visual_projection.weight, b.image_encoder.visual_projection.weight)


def test_random_model_in_bfloat16_restores_the_default_dtype():
    model = load_model("random:tiny", torch.bfloat16, CPU)
    assert all(p.dtype == torch.bfloat16 for m in (model.unet, model.vae, model.image_encoder)
               for p in m.parameters())
    assert torch.get_default_dtype() == torch.float32


def test_random_names():
    assert {"tiny", "svd-xt"} <= set(random_names())
    with pytest.raises(AnimateError, match="unknown random model 'nope'.*tiny"):
        load_model("random:nope", torch.float32, CPU)


# ---------------------------------------------------------------- local folders in diffusers layout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """random:tiny saved by diffusers itself: a plain safetensors folder and an fp16-variant-only one."""
    model = load_model("random:tiny", torch.float32, CPU)
    pipe = StableVideoDiffusionPipeline(
        vae=model.vae, image_encoder=model.image_encoder, unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
        feature_extractor=model.feature_extractor)
    root = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(root / "plain", safe_serialization=True)
    pipe.save_pretrained(root / "fp16", safe_serialization=True, variant="fp16")
    assert (root / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (root / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return root


def copy_of(saved, name, tmp_path):
    return shutil.copytree(saved / name, tmp_path / name)


def png_frames(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


def test_folder_metadata_defaults(saved):
    """A folder without animate.json: SVD's native size, and the UNet's own frame count (not always 25)."""
    model = load_model(str(saved / "plain"), torch.float32, CPU)
    assert not model.random_weights and model.source == str(saved / "plain")
    assert model.native_size == (1024, 576)
    assert model.frames == model.unet.config.num_frames == 4
    assert model.revision is None


def test_folder_weights_are_the_saved_ones(saved):
    reference = load_model("random:tiny", torch.float32, CPU)
    for variant in ("plain", "fp16"):
        model = load_model(str(saved / variant), torch.float32, CPU)
        assert model.dtype == torch.float32
        for name, tensor in reference.unet.state_dict().items():
            assert torch.equal(model.unet.state_dict()[name], tensor), (variant, name)


def test_loading_a_folder_suggests_no_install(saved):
    """accelerate is not a dependency: loading a folder without it logs no advice to install it."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        load_model(str(saved / "plain"), torch.float32, CPU)
    finally:
        root.removeHandler(handler)
    assert not [r for r in records if "accelerate" in r.getMessage()]


def test_fp16_variant_preferred_for_half_precision(saved, monkeypatch):
    import animate_cli.models as models

    seen = []
    real = models.UNetSpatioTemporalConditionModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("variant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models.UNetSpatioTemporalConditionModel, "from_pretrained", spy)
    model = load_model(str(saved / "fp16"), torch.bfloat16, CPU)
    assert model.dtype == torch.bfloat16
    load_model(str(saved / "plain"), torch.bfloat16, CPU)
    load_model(str(saved / "fp16"), torch.float32, CPU)  # only fp16 files there: those, upcast
    assert seen == ["fp16", None, "fp16"]


@pytest.mark.parametrize("variant", ["plain", "fp16"])
def test_cli_with_a_folder_gives_random_tiny_s_frames(cli, make_image, saved, tmp_path, variant):
    image = make_image("photo.png")
    common = [image, *FAST, "--seed", "21", "--size", "64x32", "--frames", "4"]
    reference = cli(*common, "-o", tmp_path / "ref", "--model", "random:tiny")
    assert reference.exit_code == 0, reference.stderr
    report = tmp_path / "run.json"
    result = cli(*common, "-o", tmp_path / "folder", "--model", saved / variant, "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["model"] == str(saved / variant) and data["random_weights"] is False and data["note"] is None
    # Same weights, but loaded tensors sit differently in memory than freshly built ones, and CPU kernels may
    # then sum in another order (the CLIP embedding differs by ~2e-7): equal up to uint8 rounding.
    assert_frames_close(png_frames(tmp_path / "folder"), png_frames(tmp_path / "ref"))


def test_pickled_weights_are_refused(cli, make_image, saved, tmp_path):
    folder = copy_of(saved, "plain", tmp_path)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    (folder / "image_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    out = tmp_path / "out"
    out.mkdir()
    assert_user_error(cli(make_image(), "-o", out / "o.mp4", *FAST, "--model", folder), str(folder),
                      "unet/diffusion_pytorch_model.safetensors is missing", "only safetensors")
    assert leftovers(out, set()) == []


def test_folder_missing_a_component(saved, tmp_path):
    folder = copy_of(saved, "plain", tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(AnimateError, match="not a Stable Video Diffusion folder in diffusers layout \\(no vae\\)"):
        load_model(str(folder), torch.float32, CPU)


# ---------------------------------------------------------------- the hub cache, offline


def fake_hub_cache(saved, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The plain folder laid out as huggingface_hub's cache holds a downloaded repo."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(saved / "plain", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo, commit


def test_cached_hub_model_loads_offline(saved):
    repo, commit = fake_hub_cache(saved, "tester/tiny-svd")
    try:
        model = load_model("tester/tiny-svd", torch.float32, CPU, progress=False)
        assert model.source == "tester/tiny-svd" and not model.random_weights
        assert model.revision == commit
        assert model.frames == 4
    finally:
        shutil.rmtree(repo)


def test_uncached_hub_model_offline(cli, make_image, tmp_path):
    assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *FAST, "--model", "someone/not-cached"),
                      "someone/not-cached", "not in the local cache and the hub is offline")
    assert leftovers(tmp_path, {"img.png"}) == []
