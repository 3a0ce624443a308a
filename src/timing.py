"""Training speed, one definition for every tool of the repo (benchmarks/throughput.py, benchmarks/ddp_scaling.py,
the `TrainSpeed` and `ExperimentMetrics` callbacks):

    img/s = images of the timed optimizer steps ÷ time between step boundaries

A step boundary is the moment a training step's work has finished on the device, so the interval between two
boundaries holds everything one step costs: waiting for the batch, host-to-device copy, forward, backward,
optimizer, EMA, logging, and any time the device sat idle waiting for the host. The first `warmup` steps
(compilation, autotuning, allocator growth) are not timed, nor is the interval before the first step after
`restart()` (an epoch start: validation, checkpointing and loader start-up sit there). Images are counted over
all processes of a data-parallel run.

On a CUDA device the timed boundaries are CUDA events recorded on the current stream after each step: the
device stamps them when it gets there, and the timer reads them later (when they have passed, or when a result
is asked for), so timing never makes the host wait for the device. A timer that synchronised at every step
would itself slow the step down: the host's work before the next step's first kernel (the training loop's
bookkeeping, fetching and copying the batch, mixup) would then always run with the device idle. Warm-up
steps are synchronised (their wall time is what `compile s` reports). On the CPU, boundaries are wall-clock
times (the CPU's work is done when a step returns).

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


def host_issue_s(step, device: torch.device | str | None, repeats: int = 3) -> float:
    """The host's time to issue one `step()` from an idle device (until it returns), median of `repeats`, in
    seconds. Close to the step's wall time (`StepTimer`), the host bounds the step (Python, launches), not the
    device; on the CPU the two are the same thing."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    synchronize(device)
    return statistics.median(times)


class StepTimer:
    """Times training steps between step boundaries (see the module docstring).

        timer = StepTimer(warmup=10, device="cuda")
        timer.begin()                  # optional: start of the first step, for compile_s
        for batch in loader:
            train_step(batch)
            timer.step(len(batch))     # a step boundary (no wait for the device after warm-up)
        timer.img_per_s, timer.compile_s   # reading a result waits for the steps still in flight
    """

    def __init__(self, warmup: int = 10, device: torch.device | str | None = None):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {warmup}")
        self.warmup, self.device = warmup, device
        self._events = device is not None and torch.device(device).type == "cuda"
        self.steps = 0  # boundaries seen
        self.timed_steps = 0  # boundaries issued that will be timed (resolved or still in flight)
        self._images = 0  # images of the resolved timed steps
        self._seconds = 0.0  # their time
        self._durations: list[float] = []  # each resolved timed step's
        self.first_step_s: float | None = None
        self._begin: float | None = None
        self._last: float | None = None  # wall time of the last boundary (CPU)
        self._after_restart = True  # the next boundary is not timed (the run's first, or the first after restart())
        self._pending: list[tuple[object, int | None]] = []  # (event, images or None if untimed), oldest first
        self._last_event = None  # the newest resolved boundary's event

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        """Just before the first step: its wall time becomes `first_step_s`."""
        if self.steps == 0:
            self._begin = self.now()

    def restart(self) -> None:
        """The next step's interval is not timed (call at an epoch start: validation and loader start-up precede it)."""
        self._after_restart = True

    def step(self, images: int) -> bool:
        """A step of `images` images (all processes) has been issued. Returns whether it is timed (not a warm-up
        step and not the first after `restart()`); on a CUDA device its time is known once the device has
        finished it."""
        self.steps += 1
        timed = not self._after_restart and self.steps > self.warmup
        self._after_restart = False
        if timed:
            self.timed_steps += 1
        synced = not self._events or self.steps <= self.warmup or self.steps == 1
        now = self.now() if synced else None
        if self.steps == 1 and self._begin is not None:
            self.first_step_s = now - self._begin
        if self._events:
            event = self._new_event()
            event.record()
            self._pending.append((event, images if timed else None))
            self._resolve(wait=False)
        else:
            if timed:
                self._add(images, now - self._last)
            self._last = now
        return timed

    def _new_event(self):
        return torch.cuda.Event(enable_timing=True)

    def _add(self, images: int, seconds: float) -> None:
        self._images += images
        self._seconds += seconds
        self._durations.append(seconds)

    def _resolve(self, wait: bool = True) -> None:
        """Fold the boundaries the device has passed (all of them, waiting, when `wait`) into the totals."""
        while self._pending:
            event, images = self._pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                break
            self._pending.pop(0)
            if images is not None:
                self._add(images, self._last_event.elapsed_time(event) / 1e3)
            self._last_event = event

    @property
    def images(self) -> int:
        """Images of the timed steps (waits for the steps in flight)."""
        self._resolve()
        return self._images

    @property
    def seconds(self) -> float:
        """Time of the timed steps (waits for the steps in flight)."""
        self._resolve()
        return self._seconds

    @property
    def durations(self) -> list[float]:
        """Each timed step's seconds (waits for the steps in flight)."""
        self._resolve()
        return self._durations

    @property
    def img_per_s(self) -> float | None:
        seconds = self.seconds
        return self._images / seconds if seconds > 0 else None

    @property
    def steady_step_s(self) -> float | None:
        durations = self.durations
        return statistics.median(durations) if durations else None

    @property
    def compile_s(self) -> float | None:
        """First step's seconds less a steady step's (None before a step has been timed or without `begin()`)."""
        if self.first_step_s is None or self.steady_step_s is None:
            return None
        return max(self.first_step_s - self.steady_step_s, 0.0)
