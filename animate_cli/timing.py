"""Stage timing with the device synchronised at every stage boundary, so GPU figures are real. Denoising steps
are timed with CUDA events on a GPU, so timing a step does not stall the queue of the next one."""

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
        self._step_times: list[float] = []
        self._step_marks: list = []  # CUDA events (or perf_counter readings on a CPU), one per step boundary
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

    def mark_step(self) -> None:
        """A step boundary: the first call starts the clock, each later one ends a step. On a GPU an event is
        recorded in the stream, so the step's time is the device's, read once the stage has synchronised."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._step_marks.append(event)
        else:
            self._step_marks.append(time.perf_counter())
            if len(self._step_marks) > 1:
                self._step_times.append(self._step_marks[-1] - self._step_marks[-2])
                self._step_marks = self._step_marks[-1:]

    def end_steps(self) -> None:
        """Close the step clock: the next mark_step starts a new run of steps."""
        self._read_events()
        self._step_marks = []

    @property
    def step_times(self) -> list[float]:
        """Seconds per step so far (waits for the device where steps are still pending)."""
        self._read_events()
        return self._step_times

    def _read_events(self) -> None:
        """On a GPU: the steps between the events recorded so far, once the last of them has happened."""
        if self.device.type == "cuda" and len(self._step_marks) > 1:
            self._step_marks[-1].synchronize()
            marks = self._step_marks
            self._step_times += [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:], strict=False)]
            self._step_marks = marks[-1:]

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
