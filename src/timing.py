"""Training speed, one definition for every tool of the repo (benchmarks/throughput.py, benchmarks/ddp_scaling.py,
the `TrainSpeed` and `ExperimentMetrics` callbacks):

    img/s = images of the timed optimizer steps ÷ wall time between synchronised step boundaries

A step boundary is the moment a training step has finished on the device (CUDA synchronised), so the interval
between two boundaries holds everything one step costs: waiting for the batch, host-to-device copy, forward,
backward, optimizer, EMA, logging. The first `warmup` steps (compilation, autotuning, allocator growth) are not
timed, nor is the interval before the first step after `restart()` (an epoch start: validation, checkpointing
and loader start-up sit there). Images are counted over all processes of a data-parallel run.

compile s = wall time of the first step (from `begin()`, just before it, to its boundary) less a steady step's
(the median of the timed steps): what compilation and first-call tuning add to a run's start.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times training steps between synchronised boundaries (see the module docstring).

        timer = StepTimer(warmup=10, device="cuda")
        timer.begin()                  # optional: start of the first step, for compile_s
        for batch in loader:
            train_step(batch)
            timer.step(len(batch))     # a step boundary
        timer.img_per_s, timer.compile_s
    """

    def __init__(self, warmup: int = 10, device: torch.device | str | None = None):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
        self.warmup, self.device = warmup, device
        self.steps = 0  # boundaries seen
        self.images = 0  # images of the timed steps
        self.seconds = 0.0  # their wall time
        self.durations: list[float] = []  # each timed step's
        self.first_step_s: float | None = None
        self._begin: float | None = None
        self._last: float | None = None

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        """Just before the first step: its wall time becomes `first_step_s`."""
        if self.steps == 0:
            self._begin = self.now()

    def restart(self) -> None:
        """The next step's interval is not timed (call at an epoch start: validation and loader start-up precede it)."""
        self._last = None

    def step(self, images: int) -> float | None:
        """A step of `images` images (all processes) has been issued: synchronise, and time it unless it is a
        warm-up step or follows a `restart()`. Returns the step's seconds when it was timed."""
        now = self.now()
        self.steps += 1
        if self.steps == 1 and self._begin is not None:
            self.first_step_s = now - self._begin
        last, self._last = self._last, now
        if last is None or self.steps <= self.warmup:
            return None
        self.images += images
        self.seconds += now - last
        self.durations.append(now - last)
        return now - last

    @property
    def last_boundary(self) -> float | None:
        """perf_counter time of the last step boundary (None at the start and after `restart()`)."""
        return self._last

    @property
    def img_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def steady_step_s(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None

    @property
    def compile_s(self) -> float | None:
        """First step's seconds less a steady step's (None before a step has been timed or without `begin()`)."""
        if self.first_step_s is None or self.steady_step_s is None:
            return None
        return max(self.first_step_s - self.steady_step_s, 0.0)
