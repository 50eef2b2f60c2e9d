"""Training checkpoints as one safetensors file: the tensors, plus the rest of the state (counters, config,
optimizer hyper-parameters) as JSON in the file's metadata. No pickle: loading runs no code."""

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from animate_cli.errors import AnimateError


def save_checkpoint_file(path: Path, state: dict) -> None:
    """Written under a temporary name, then renamed: a crash mid-save keeps the previous checkpoint."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = obj.detach().to("cpu").contiguous().clone()  # clone: no shared storage
            return {"tensor": name}
        if isinstance(obj, dict):
            return {"dict": [[k, encode(v)] for k, v in obj.items()]}  # keeps int keys (optimizer state)
        if isinstance(obj, list | tuple):
            return {"list": [encode(v) for v in obj]}
        if obj is None or isinstance(obj, bool | int | float | str):
            return {"value": obj}
        raise TypeError(f"cannot checkpoint a {type(obj).__name__}")

    skeleton = json.dumps(encode(state))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"animate-checkpoint": skeleton})
    os.replace(tmp, path)


def load_checkpoint_file(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            skeleton = json.loads((f.metadata() or {})["animate-checkpoint"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, KeyError, ValueError, Exception) as e:  # noqa: BLE001 - any unreadable file is one problem
        raise AnimateError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start over") from None

    def decode(node: dict) -> Any:
        kind, payload = next(iter(node.items()))
        if kind == "tensor":
            return tensors[payload]
        if kind == "dict":
            return {k: decode(v) for k, v in payload}
        if kind == "list":
            return [decode(v) for v in payload]
        return payload

    return decode(skeleton)
