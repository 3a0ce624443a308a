"""Host cost of this package's Triton launches in one eager training step (GPU). Every launch of one step of the
backbone (through `src.kernels.ahead.launch`) is recorded with its arguments, then the whole list is replayed
from an idle GPU by several paths and the host's time for all of them is printed:

    python benchmarks/launches.py                       # T, fused backend, Triton norms/convs/drop path, bf16
    python benchmarks/launches.py --model s --batch 64 --reps 9

| path | what it times |
|---|---|
| package | `ahead.launch`, as the ops call it (direct launches after a variant's first) |
| keys only | the kernels' own key functions and their lookups, no launch |
| general keys only | the general key (`arg_key` per argument) and its lookup, no launch |
| compiled launcher | the kept variants' `compiled.run(...)` alone: Triton's launcher object |
| direct launcher | what a direct launch calls, alone: with Triton 3.6 the launcher's C function (`ahead._launcher`) |
| through Triton | `kernel[grid](...)`, Triton's own path with its per-call binding and key |

The package's path less the compiled launcher is what the package's own launch code costs the host per step;
eager training of the backbone at batch 128 is bound by the host, so this is time off every eager step. The
replays launch the step's kernels again on its own tensors (their results are not used). The step is the
`throughput.py` loop's (channels-last, autocast, AdamW with `fused=True`, synthetic batch).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.errors import UserError, reports_user_errors  # noqa: E402
from src.kernels import ahead  # noqa: E402
from src.models.spatial_mamba import spatial_mamba_b, spatial_mamba_s, spatial_mamba_t  # noqa: E402

FACTORIES = {"t": spatial_mamba_t, "s": spatial_mamba_s, "b": spatial_mamba_b}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def kernel_name(kernel) -> str:
    """A @triton.jit kernel's function name."""
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None) or str(kernel)


def record_step(step) -> list[tuple]:
    """(kernel, grid, args, kwargs) of every launch `step()` makes through the package's launch path."""
    launches = []
    real = ahead._launch_now

    def recording(kernel, grid, args, kwargs):
        launches.append((kernel, grid, args, kwargs))
        real(kernel, grid, args, kwargs)

    ahead._launch_now = recording
    try:
        step()
        torch.cuda.synchronize()
    finally:
        ahead._launch_now = real
    return launches


def replay_paths(launches: list[tuple]) -> dict:
    """name -> a function that replays (or keys) every recorded launch one way."""
    get_device, get_stream, _ = ahead._fast
    device = get_device()
    kept = []
    for kernel, grid, args, kwargs in launches:
        entry = ahead._compiled.get((id(kernel), device, *kwargs.items(), *map(ahead.arg_key, args)))
        if entry is None:
            raise UserError(f"a launch of {kernel_name(kernel)} was not direct (a launch hook "
                            "installed, SPATIAL_MAMBA_FAST_LAUNCH=0, or an argument without a key): nothing to time")
        kept.append(entry)

    direct = []
    for kernel, _, args, kwargs in launches:
        key_of, variants, _ = ahead._direct.get(kernel, (None, {}, None))
        try:
            direct.append(variants.get(key_of(device, args, kwargs)))
        except Exception:  # noqa: BLE001 - arguments of other kinds than the key function's: no direct entry
            direct.append(None)

    def package():
        for kernel, grid, args, kwargs in launches:
            ahead.launch(kernel, grid, *args, **kwargs)

    def keys_only():
        d = get_device()
        for kernel, _, args, kwargs in launches:
            key_of, variants, _ = ahead._direct[kernel]
            try:
                variants.get(key_of(d, args, kwargs))
            except Exception:  # noqa: BLE001 - arguments of other kinds: the package's launch takes the general key
                pass

    def general_keys_only():
        d = get_device()
        for kernel, _, args, kwargs in launches:
            ahead._compiled.get((id(kernel), d, *kwargs.items(), *map(ahead.arg_key, args)))

    def compiled_launcher():
        for (_, grid, args, _), (compiled, tail, _) in zip(launches, kept):
            n = len(grid)
            compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(get_device()),
                         compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)

    def direct_launcher():
        for (_, grid, args, _), (run, head, function, tail) in zip(launches, direct):
            n = len(grid)
            run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(get_device()), function, *head,
                *args, *tail)

    def through_triton():
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)

    return {"package": package, "keys only": keys_only, "general keys only": general_keys_only,
            "compiled launcher": compiled_launcher,
            **({"direct launcher": direct_launcher} if all(e is not None for e in direct) else {}),
            "through Triton": through_triton}


def host_ms(fn, reps: int) -> float:
    """Median host time of `fn()` from an idle GPU, ms."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(times)


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t", choices=sorted(FACTORIES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224, help="image side")
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=12, help="untimed steps first (compiles, tile picks)")
    p.add_argument("--reps", type=int, default=7, help="replays per path (median)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("launches.py times Triton launches on a CUDA GPU; none is visible to torch (the direct "
                        "launch path is off in the Triton interpreter)")
    if args.batch < 1 or args.size < 32 or args.warmup < 1 or args.reps < 1:
        raise UserError("--batch, --warmup and --reps must be at least 1 and --size at least 32, got "
                        f"{args.batch}, {args.warmup}, {args.reps} and {args.size}")
    if not (ahead._fast or ahead._resolve_fast())[0]:
        raise UserError("direct launches are off (SPATIAL_MAMBA_FAST_LAUNCH=0 or TRITON_INTERPRET=1): nothing to time")
    dev = torch.device("cuda")
    model = FACTORIES[args.model](backend="fused", fused_norms=True, fused_convs=True, fused_drop_path=True)
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    crit = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (args.batch,), device=dev)
    dtype = DTYPES[args.precision]

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    ahead.wait_all()
    launches = record_step(step)
    if not launches:
        raise UserError("the step made no launch through the package's launch path")
    paths = replay_paths(launches)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  model {args.model}  batch "
          f"{args.batch}  {args.size}²  {args.precision}  {len(launches)} launches a step")
    print("\n| path | host ms a step | µs a launch |")
    print("|---|---:|---:|")
    for name, fn in paths.items():
        ms = host_ms(fn, args.reps)
        print(f"| {name} | {ms:.2f} | {1e3 * ms / len(launches):.1f} |", flush=True)
    counts = collections.Counter(kernel_name(k) for k, *_ in launches)
    print("\nlaunches a step: " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))


if __name__ == "__main__":
    sys.exit(main())
