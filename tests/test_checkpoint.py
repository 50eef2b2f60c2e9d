"""Training checkpoints: one safetensors file, no pickle, every kind of state back as it was."""

import pytest
import torch
from safetensors import safe_open

from animate_cli.checkpoint import load_checkpoint_file, save_checkpoint_file
from animate_cli.errors import AnimateError


def test_round_trip_of_model_optimizer_rng_and_counters(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
             "step": 7, "loss": 0.25, "names": ["a.png", "b.png"], "nothing": None}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint_file(path, state)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file
        assert "animate-checkpoint" in f.metadata()
    back = load_checkpoint_file(path)
    assert (back["step"], back["loss"], back["names"], back["nothing"]) == (7, 0.25, ["a.png", "b.png"], None)
    assert torch.equal(back["rng"], state["rng"])
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # int keys and nested lists survive
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary file left


def test_a_torn_file_is_one_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint_file(path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(AnimateError, match="unreadable checkpoint"):
        load_checkpoint_file(path)
