"""A worker process of `src.compiling.ParallelRegionalCompile`: compiles one stage's block graphs so that the
parent finds them in the on-disk caches.

It is started ahead of need, when the backbone is set up for regional compilation, and spends its idle time on
what every compile needs first: Python's start, importing torch, the compiler and the model's code (not
lightning, nor the task heads: `src.models` loads those on first use), the CUDA context on the parent's device and
inductor's pool of kernel-compile processes. Then it waits for jobs: one line on stdin naming a job file (what
to compile, written by the parent at the backbone's first forward at a new input signature), answered by one
line on stdout. It serves later signatures too (the sanity check's evaluation graphs, then the training
graphs), and ends on an empty stdin (the parent finished or died) or after `IDLE_S` without a job.

    python -c "from src.compile_worker import main; raise SystemExit(main())" '{"threads": 4, "device": 0}'

Kept free of lightning on purpose: through `src.models` it cost each worker ~3 s of imports, and four workers
that imported it (and unpickled their job) reached their first line of work 15-17 s after their start on a
16-core H100 machine.
"""

from __future__ import annotations

import json
import sys
import time


def _warm(threads: int, device: int | None, times: dict) -> None:
    """What the compile needs before it starts: the compiler's modules, the CUDA context on `device` (None: none
    yet), inductor's kernel-compile pool of `threads` processes (started in the background). `times` gets the
    steps' ends."""
    import torch
    import torch._dynamo  # noqa: F401  (the imports the compile would pay for at its first call)
    import torch._inductor.compile_fx  # noqa: F401

    import src.models.spatial_mamba  # noqa: F401  (the pickled block's code)

    times["imported"] = time.time()
    if device is not None and torch.cuda.is_available():
        torch.cuda.set_device(device)
        torch.empty(1, device=f"cuda:{device}")
        times["cuda"] = time.time()
    torch._inductor.config.compile_threads = threads  # not part of any cache key
    try:  # inductor's internals: a head start only
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.warm_pool()
        if threads > 1:
            getattr(AsyncCompile.process_pool(), "wakeup", lambda: None)()
    except Exception:
        pass
    times["warm"] = time.time()


def compile_block(block, shape: tuple, dtype, device: str, training: bool, grad: bool, autocast_dtype,
                  compile_kwargs: dict, configs: dict, report: str | None = None, times: dict | None = None) -> None:
    """Compile one block as the parent will (its compiler configuration `configs`, compile arguments, input
    shape, dtype and modes) and run it forward (and backward with `grad`), so that its graphs land in the
    on-disk caches the parent shares. `report`: a JSON file for the worker's timeline (`times` plus the
    compile's steps, seconds since the epoch) and dynamo's compile phases (seconds summed over the graphs)."""
    import torch
    from torch._dynamo.utils import compilation_time_metrics

    times = dict(times or {}, job=time.time())
    compilation_time_metrics.clear()  # this job's phases only
    threads = torch._inductor.config.compile_threads
    for name, blob in configs.items():
        getattr(torch, name).config.load_config(blob)
    torch._inductor.config.compile_threads = threads  # the worker's share of the cores, not the parent's count
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    block = block.to(device).train(training)
    block.compile(**compile_kwargs)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
    times["ready"] = time.time()
    with torch.set_grad_enabled(grad), torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                                      enabled=autocast_dtype is not None):
        y = block(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times["forward"] = time.time()
    if grad:
        y.backward(torch.randn_like(y))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times["backward"] = time.time()
    if report:
        phases = {k: round(sum(v), 2) for k, v in compilation_time_metrics.items()}
        with open(report, "w") as f:
            json.dump(dict(times=times, shape=list(shape),
                           phases=dict(sorted(phases.items(), key=lambda kv: -kv[1])[:12])), f)


IDLE_S = 300.0  # a worker that got no job for this long ends (and frees its CUDA context); one is started anew


def main(argv: list[str] | None = None) -> int:
    """The worker's entry: argv[0] a JSON object {"threads": compile processes, "device": CUDA index or null}.
    Then jobs, one per line on stdin (a job file's path); after each, one line on stdout: "ok" or "failed:
    <reason>" (the traceback goes to stderr). Ends on an empty stdin or after `IDLE_S` without a job."""
    import gc
    import os
    import select
    import traceback

    # answers go to the parent through a copy of stdout; anything else printed (by torch, inductor, a kernel
    # library, a C extension) lands in the log with stderr, so the parent never reads it as an answer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    times = {"started": time.time()}
    settings = json.loads((argv if argv is not None else sys.argv[1:])[0])
    _warm(int(settings["threads"]), settings.get("device"), times)
    import torch

    while True:
        if not select.select([sys.stdin], [], [], IDLE_S)[0]:
            return 0
        path = sys.stdin.readline().strip()
        if not path:
            return 0
        try:
            torch._dynamo.reset()  # each job as in a fresh process
            compile_block(**torch.load(path, weights_only=False), times=times)
            print("ok", file=answers, flush=True)
        except Exception as e:
            traceback.print_exc()
            print(f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  file=answers, flush=True)
        times = {}
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # an idle worker keeps its context, not the job's memory
