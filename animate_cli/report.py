"""The end-of-run report: a rich table of stages, and the same figures as JSON."""

import contextlib
import json
import os
import platform
from pathlib import Path

import torch
from rich.table import Table

from animate_cli import __version__
from animate_cli.errors import AnimateError
from animate_cli.timing import StageTimer

RANDOM_WEIGHTS_NOTE = "random weights: the output is noise; timings are real, the pictures are not"


def versions() -> dict:
    import diffusers
    import transformers

    info = {
        "animate": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} torch threads of {os.cpu_count()})"


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def stage_table(timer: StageTimer, title: str, peak_gib: float | None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = timer.total()
    for name, seconds in timer.stages.items():
        table.add_row(name, f"{seconds:.3f}", f"{seconds / total:.0%}" if total else "-")
    table.add_row("[bold]total[/]", f"[bold]{total:.3f}[/]", "100%")
    figures = timer.as_dict()
    if figures["mean_step_s"] is not None:
        table.caption = (f"{figures['steps']} steps, {figures['mean_step_s']:.3f} s/step, "
                         f"{figures['unet_passes']} UNet passes in {figures['unet_calls']} calls")
    if peak_gib is not None:
        table.caption = (table.caption or "") + f", peak GPU memory {peak_gib:.2f} GiB"
    return table


def check_json_path(path: Path | None) -> None:
    """Before any work: the folder for --json exists and the name is not a folder."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or path.is_dir():
        raise AnimateError(f"--json {path}: cannot write it (no folder {parent}, or a folder by that name)")


def write_json(path: Path, record: dict) -> None:
    """Written under a temporary name, then renamed: never half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a missing or unwritable folder, or a folder named like the file: one line, not a traceback
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise AnimateError(f"--json {path}: cannot write it ({e.strerror or e})") from None
