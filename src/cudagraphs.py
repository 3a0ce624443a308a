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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["graph_step"]


def graph_step(step: Callable[[], object], optimizer: torch.optim.Optimizer | None, device: torch.device,
               warmup: int = 3) -> Callable[[], None]:
    """A function that, at its first call, runs `step` `warmup` times on a side stream (Triton compiles, tile
    choice, cuBLAS and cuDNN workspaces, the optimizer's state) and records it once as a CUDA graph, then
    replays the graph at every call (the first included). `optimizer` (None for inference) has its gradients
    set to None before each warm-up run and before the recording, so that the recorded backward allocates them
    in the graph's pool; `step` itself must not zero them. The warm-up runs are real steps: with an optimizer,
    the first call updates the weights `warmup` + 1 times."""
    replay = None

    def run() -> None:
        nonlocal replay
        if replay is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    if optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            replay = graph.replay
        replay()

    return run
