"""CUDA graphs without `torch.compile`: eager kernels recorded once and replayed.

Eager Spatial-Mamba-T on an H100 VM is bound by the host (~100 ms to issue a training step whose kernels take
80–105 ms), and compiling it first costs minutes. Recording the eager step as a CUDA graph takes the host out of
the step without compiling anything: `benchmarks/throughput.py --modes graphed` trained T at 1580 img/s with the
Triton LayerNorms (the backbone's `fused_norms`) and 1234 with nn.LayerNorm, against 751 / 969 eager on the same
machine (benchmarks/RESULTS.md).

`graph_step(step, optimizer, device)` is what the benchmarks use: a whole training step (forward, loss,
backward, optimizer step) or an inference forward, as one graph. Its rules are CUDA graphs' rules: fixed input
tensors (write new data into them in place), no host synchronisation inside the step, an optimizer created with
`capturable=True`, no loss scaling, and autocast without its weight cache (`cache_enabled=False`: a cast made
while recording would be freed while the graph still reads it). The gradients live in the graph's memory pool
and are overwritten, not accumulated, by each replay.

For the LightningModules (`eager_cudagraphs` in the classifier), where Lightning runs the optimizer, the loss
and the EMA update, the pieces are recorded instead of the whole step:

* `graph_training_forward(module, sample, dtype)`: in place, `module`'s forward and backward in training mode
  for inputs shaped like `sample` become one recorded graph each (`torch.cuda.make_graphed_callables`); other
  shapes, eval mode or no-grad calls run the module's own forward. The optimizer, the loss, gradient clipping
  and the EMA update stay eager (a few fused kernels).
* `InferenceGraph(module, sample, dtype)`: a no-grad forward (the MESA teacher's) recorded once; calls with
  another shape run the module itself.

Recording leaves no trace: its warm-up passes (three forwards and backwards on `sample`) update BatchNorm's
running statistics and draw drop-path masks from the CUDA generator, so both record with the module's buffers
and the generator's state saved first and put back afterwards. The first replay then computes what the first
eager step would have, masks included (a recorded draw takes its numbers from the generator's state at each
replay), and a run resumed from a checkpoint, which records again at its first step, continues bit for bit
as the uninterrupted run.

Both need the parameters to stay where they are (optimizers, EMA updates and `load_state_dict` write in
place; `.to(...)` after recording would not). The graph's outputs are overwritten by its next replay:
`InferenceGraph` returns a copy; `graph_training_forward`'s outputs are consumed by the step's loss before the
next replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

__all__ = ["InferenceGraph", "autocast_dtype", "graph_step", "graph_training_forward"]


@contextlib.contextmanager
def _leaving_no_trace(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Put `module`'s buffers (BatchNorm running statistics and counters) and `device`'s CUDA generator state
    back as they were once the block is done: a recording's warm-up passes are not steps of the run."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.cuda.set_rng_state(rng, device)


def _record(step: Callable[[], object], device: torch.device, warmup: int,
            before: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `step` `warmup` times on a side stream (Triton compiles, tile choice, cuBLAS and cuDNN workspaces, an
    optimizer's state), then record one call as a CUDA graph; `before` runs before each of those calls, outside
    the recording. Returns the graph and what the recorded call returned (its outputs, in the graph's pool)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if before is not None:
                before()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    if before is not None:
        before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def graph_step(step: Callable[[], object], optimizer: torch.optim.Optimizer | None, device: torch.device,
               warmup: int = 3) -> Callable[[], None]:
    """A function that, at its first call, runs `step` `warmup` times on a side stream and records it once as a
    CUDA graph (`_record`), then replays the graph at every call (the first included). `optimizer` (None for
    inference) has its gradients set to None before each warm-up run and before the recording, so that the
    recorded backward allocates them in the graph's pool; `step` itself must not zero them. The warm-up runs
    are real steps: with an optimizer, the first call updates the weights `warmup` + 1 times."""
    replay = None

    def run() -> None:
        nonlocal replay
        if replay is None:
            before = (lambda: optimizer.zero_grad(set_to_none=True)) if optimizer is not None else None
            replay = _record(step, device, warmup, before)[0].replay
        replay()

    return run


def autocast_dtype(device_type: str = "cuda") -> torch.dtype | None:
    """The dtype autocast casts to right now on `device_type`, None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _recording_autocast(dtype: torch.dtype | None):
    """Autocast as the step runs it, without the cast-weight cache (a cached cast made while recording would be
    freed after the recording while the graph still reads it)."""
    if dtype is None:
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def _same_layout(x: torch.Tensor, sample: torch.Tensor) -> bool:
    return (x.is_cuda and x.shape == sample.shape and x.stride() == sample.stride() and x.dtype == sample.dtype
            and x.device == sample.device)


def graph_training_forward(module: nn.Module, sample: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Record `module`'s training forward and backward for inputs like `sample` (CUDA, shape, strides, dtype)
    under autocast to `dtype` (None: no autocast), in place (module docstring)."""
    if not sample.is_cuda:
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {sample.device}")
    own_forward = module.forward
    sample = sample.detach().clone(memory_format=torch.preserve_format)
    with _leaving_no_trace(module, sample.device), _recording_autocast(dtype):
        torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=3, allow_unused_input=True)
    graphed = module.forward  # make_graphed_callables set it on the instance; it runs the graph in training mode

    def forward(x, *args, **kwargs):
        if not args and not kwargs and module.training and torch.is_grad_enabled() and _same_layout(x, sample):
            return graphed(x)
        return own_forward(x, *args, **kwargs)

    module.forward = forward


class InferenceGraph:
    """A no-grad forward of `module` (in its current mode) recorded for inputs like `sample` under autocast to
    `dtype`; calling it with such an input replays the graph and returns a copy of the output, any other input
    runs `module(x)`."""

    def __init__(self, module: nn.Module, sample: torch.Tensor, dtype: torch.dtype | None):
        if not sample.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {sample.device}")
        self.module = module
        self.input = sample.detach().clone(memory_format=torch.preserve_format)

        def forward():
            with torch.no_grad(), _recording_autocast(dtype):
                return module(self.input)

        with _leaving_no_trace(module, sample.device):
            self.graph, self.output = _record(forward, sample.device, warmup=3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not _same_layout(x, self.input):
            return self.module(x)
        self.input.copy_(x)
        self.graph.replay()
        return self.output.clone()
