"""Stage timing with the device synchronised before every clock read, so GPU figures are real."""

import contextlib
import time
from collections import defaultdict

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Seconds per named stage (summed over calls), per denoising step, and UNet passes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stages: dict[str, float] = defaultdict(float)
        self.step_times: list[float] = []
        self.unet_calls = 0
        self.unet_passes = 0  # per video: a guided call is two passes (conditional and unconditional)

    @contextlib.contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.stages[name] += time.perf_counter() - start

    def total(self) -> float:
        return sum(self.stages.values())

    def as_dict(self) -> dict:
        steps = self.step_times
        return {
            "stages": dict(self.stages),
            "total_s": self.total(),
            "steps": len(steps),
            "mean_step_s": sum(steps) / len(steps) if steps else None,
            "unet_calls": self.unet_calls,
            "unet_passes": self.unet_passes,
        }
