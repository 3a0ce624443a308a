"""Which thread runs the backward of a training step.

PyTorch's autograd engine runs the backward of CUDA tensors on a worker thread of its own per device
(`pt_autograd_0`), while the thread that called `loss.backward()` waits for it. With one GPU per process
nothing runs beside that worker, so the handover buys no parallelism, and where the host sets the pace of a step,
as in eager Spatial-Mamba-T (about 1850 kernels a step, launched one by one from Python and C++), it cost time on
the GPU machines measured: the forward and the optimizer run on one core, the backward on another, and the cores
of one such host ran a fixed Python loop at two speeds 1.7 × apart, which core was slow changing within seconds.
A step spread over two cores meets a slow core more often than a step kept on one; the worker's wake-up and the
tensors and autograd nodes the forward made on another core's caches may add to it. Measured on two H200s
(benchmarks/RESULTS.md, the eager T step at batch 128, bf16, steps alternating between the two ways in one
process): 113 against 78 ms a step and 114 against 84 (worker thread against training thread).

`torch.autograd.set_multithreading_enabled(False)` makes the engine run the backward on the calling thread.
The LightningModules do that where their backbone runs eagerly (eager kernels, or the eager step recorded as CUDA
graphs) and leave PyTorch's worker thread to compiled backbones, unless their `backward_device_thread` says which
(`TrainingThreadBackward`); `benchmarks/throughput.py` follows the same rule unless `--backward-thread` says.
Compiled, the one A/B so far went the other way (compiled T on one H200: 74 ms a step on the worker thread, 93 on
the training thread, three rounds each in one process): a compiled backward is one autograd node whose generated
code issues its launches, with few Python objects of the forward's to read, and on that evidence it keeps
PyTorch's default. Gradients are the same either way (the same kernels in the same order on the same stream); on
a CPU the backward ran on the calling thread already. The setting is thread-local and undone when the backward
returns.
"""

from __future__ import annotations

import torch


class TrainingThreadBackward:
    """LightningModule mixin (listed before `LightningModule`): Lightning's `backward` hook — automatic and
    manual optimisation alike — runs `loss.backward()` on the training thread or on PyTorch's autograd worker
    thread of the device, as the module's hyperparameter `backward_device_thread` says: true for the worker, false
    for the training thread, None (absent) for the worker if the module compiled its backbone (its `_compiled`),
    else the training thread."""

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with torch.autograd.set_multithreading_enabled(self.backward_on_device_thread()):
            super().backward(loss, *args, **kwargs)

    def backward_on_device_thread(self) -> bool:
        flag = getattr(self, "hparams", {}).get("backward_device_thread")
        return bool(getattr(self, "_compiled", False)) if flag is None else bool(flag)


__all__ = ["TrainingThreadBackward"]
