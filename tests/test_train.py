"""Training of the tiny-motion model on a micro config: data, loss, checkpoint/resume, the train-tiny command."""

import json

import numpy as np
import pytest
import torch

from animate_cli import clips, train


def test_clips_are_reproducible_and_heldout_is_disjoint():
    a, ma = clips.training_batch(3, 2, frames=4, size=16)
    b, mb = clips.training_batch(3, 2, frames=4, size=16)
    assert a.shape == (2, 4, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    train_scenes = {clips.make_clip(clips.TRAIN, 0, i).scene for i in range(50)}
    held = {c.scene for c in clips.heldout(50)}
    assert not train_scenes & held
    clip = clips.heldout(1, frames=8, size=32)[0]
    assert not np.array_equal(clip.frames[0], clip.frames[-1]), "the shape moves"


def test_unet_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    c = train.micro_config(lr=2e-3)
    state = train.new_state(c)
    batch, motions = clips.training_batch(0, 2, c.frames, c.size)
    params = [*state.unet.parameters(), *state.image_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)

    def loss_now():
        return train.unet_loss(c, state.vae, state.unet, state.image_encoder, batch, motions,
                               torch.Generator().manual_seed(0))

    first = loss_now().item()
    for _ in range(25):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.7 * first


def test_vae_loss_goes_down():
    c = train.micro_config(vae_steps=30, unet_steps=0)
    state = train.train(train.new_state(c), log=lambda m: None, log_every=5)
    losses = [loss for _, phase, loss in state.history if phase == "vae"]
    assert losses[-1] < losses[0]
    assert state.vae.config.scaling_factor != 1.0  # measured at the end of the VAE phase


def weights(state):
    return {f"{n}.{k}": v.clone() for n in ("vae", "unet", "image_encoder", "ema_unet")
            for k, v in getattr(state, n).state_dict().items()}


def test_checkpoint_resumes_exactly(tmp_path):
    c = train.micro_config(vae_steps=3, unet_steps=4)
    quiet = dict(log=lambda m: None)
    whole = train.train(train.new_state(c), **quiet)
    ckpt = tmp_path / "ckpt.pt"
    part = train.train(train.new_state(c), ckpt, until=5, **quiet)  # stops mid UNet phase
    assert part.step == 5
    resumed = train.load_checkpoint(ckpt)
    assert resumed.step == 5 and resumed.history == part.history
    assert resumed.vae.config.scaling_factor == part.vae.config.scaling_factor
    resumed = train.train(resumed, ckpt, **quiet)
    assert resumed.step == whole.step == 7
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_train_tiny_command_trains_resumes_and_exports(cli, tmp_path):
    work = tmp_path / "run"
    r = cli("train-tiny", str(work), "--micro", "--vae-steps", "2", "--unet-steps", "2")
    assert r.exit_code == 0, r.stderr
    assert (work / "checkpoint.safetensors").is_file() and (work / "model" / "model_index.json").is_file()
    r = cli("train-tiny", str(work), "--unet-steps", "4")
    assert r.exit_code == 0, r.stderr
    assert "resumed" in r.stderr and "at step 4" in r.stderr
    meta = json.loads((work / "model" / "animate.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["native_size"] == [16, 16] and meta["frames"] == 4
    r = cli("train-tiny", str(work), "--batch", "3")
    assert r.exit_code == 2 and "cannot change on resume" in r.stderr

    from animate_cli.models import load_model

    model = load_model(str(work / "model"), torch.float32, torch.device("cpu"))
    assert not model.random_weights and model.frames == 4 and model.vae_scale == 2


@pytest.mark.parametrize("kind", clips.KINDS)
def test_every_kind_renders_inside_the_frame(kind):
    scene = clips.Scene(kind=kind, colour=(1.0, 0.0, 0.0), hue=0.0, radius=0.15, start=(0.5, 0.5), angle=0.0,
                        bg=(0.2, 0.2, 0.2), bg_grad=(0.0, 0.0, 0.0), grad_angle=0.0)
    frames = clips.render(scene, 8, 32)
    red = (frames[..., 0] > 128) & (frames[..., 1] < 100)
    assert red.sum(axis=(1, 2)).min() > 10
    xs = [np.nonzero(f)[1].mean() for f in red]
    assert xs[-1] > xs[0] + 5  # hue 0: moves right
