"""Which thread runs the backward of a training step.

PyTorch's autograd engine runs the backward of CUDA tensors on a worker thread of its own per device
(`pt_autograd_0`), while the thread that called `loss.backward()` waits for it. With one GPU per process
nothing runs beside that worker, so the handover buys no parallelism; what it costs shows where the host sets
the pace of a step, as in eager Spatial-Mamba-T (about 1850 kernels a step, launched one by one from Python
and C++): the forward and the optimizer run on one core, the backward on another, and on the GPU machines
measured the cores of one host ran a fixed Python loop at two speeds 1.7 × apart, which core was slow changing
within seconds. A step spread over two cores is slowed by whichever of them is slow; it also pays the
worker's wake-up and the move of every tensor and autograd node the forward made between the two cores'
caches. Measured on one H200 (benchmarks/RESULTS.md, the eager T step at batch 128, bf16, steps alternating
between the two ways in one process): 113 ms a step with the worker thread, 78 ms on the training thread.

`torch.autograd.set_multithreading_enabled(False)` makes the engine run the backward on the calling thread.
The LightningModules call their backward that way unless their `backward_device_thread` is true
(`TrainingThreadBackward`); `benchmarks/throughput.py` does the same unless `--backward-thread device`.
Gradients are the same either way (the same kernels in the same order on the same stream); on a CPU the
backward ran on the calling thread already. The setting is thread-local and undone when the backward
returns.
"""

from __future__ import annotations

import torch


class TrainingThreadBackward:
    """LightningModule mixin (listed before `LightningModule`): Lightning's `backward` hook — automatic and
    manual optimisation alike — runs `loss.backward()` on the training thread, unless the module's hyperparameter
    `backward_device_thread` is true (PyTorch's default, the device's autograd worker thread)."""

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        device_thread = bool(getattr(self, "hparams", {}).get("backward_device_thread", False))
        with torch.autograd.set_multithreading_enabled(device_thread):
            super().backward(loss, *args, **kwargs)


__all__ = ["TrainingThreadBackward"]
