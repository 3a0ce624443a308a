"""Benchmark of the structure-aware SSM op: reference (torch), `triton` (Triton scan + torch fusion) and
`fused` (one Triton op), forward and forward+backward, fp32 and bf16, at the stage shapes of Spatial-Mamba-T
at 224² (B=128) and a dense-task shape, against the op's memory-traffic floor.

Floor: each input read once and each output written once, at the device copy bandwidth measured in the
same run (bytes read + written by a large device-to-device copy / time):
    forward           x, dt read; y written               3·B·D·L elements (+ B, C: 2·B·L)
    forward+backward  forward + dy, x, dt read; dx, ddt written (+ B, C and dB, dC)   8·B·D·L (+ 6·B·L)
Activations in the benchmark dtype, parameters fp32 (as the model under autocast), channels last
(x, dt (B, L, D), B, C (B, L, 1)) as the model passes them. Times: median of `triton.testing.do_bench`.
`--profile` adds the `torch.profiler` device time of each kernel in one forward+backward at stage 1 (bf16).

    PYTHONPATH=. python benchmarks/ops.py [--quick] [--skip-torch] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
from triton.testing import do_bench

from src.errors import reports_user_errors
from src.kernels import ahead
from src.kernels.ops import structure_aware_ssm_fused, structure_aware_ssm_triton
from src.kernels.reference import structure_aware_ssm_ref

SHAPES = [  # (B, D, H, W)
    (128, 128, 56, 56),
    (128, 256, 28, 28),
    (128, 512, 14, 14),
    (128, 1024, 7, 7),
    (2, 128, 200, 336),
]
DILATIONS = [1, 3, 5]
BACKENDS = {"torch": structure_aware_ssm_ref, "triton": structure_aware_ssm_triton, "fused": structure_aware_ssm_fused}
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "weight", "alpha")


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * 2**30 / (ms * 1e-3)


def make_inputs(Bsz, D, H, W, dtype, requires_grad):
    L = H * W
    dt0 = torch.exp(torch.rand(D) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    t = dict(
        x=torch.randn(Bsz, L, D, device="cuda", dtype=dtype),
        dt=torch.randn(Bsz, L, D, device="cuda", dtype=dtype),
        A=-torch.ones(D, 1, device="cuda"),
        B=torch.randn(Bsz, L, 1, device="cuda", dtype=dtype),
        C=torch.randn(Bsz, L, 1, device="cuda", dtype=dtype),
        D=torch.ones(D, device="cuda"),
        dt_bias=(dt0 + torch.log(-torch.expm1(-dt0))).cuda(),
        weight=torch.ones(len(DILATIONS), D, 3, 3, device="cuda"),
        alpha=torch.ones(len(DILATIONS), device="cuda"),
    )
    return {n: t[n].requires_grad_(requires_grad) for n in NAMES}


def floor_bytes(Bsz, D, H, W, dtype, backward: bool) -> int:
    e = torch.finfo(dtype).bits // 8
    per_elem, per_token = (8, 6) if backward else (3, 2)
    return (per_elem * Bsz * D * H * W + per_token * Bsz * H * W) * e


def bench(fn, t, H, W, backward: bool) -> float:
    args = [t[n] for n in NAMES]
    # the first call for a shape compiles the backward's kernels in background threads (src/kernels/ahead.py):
    # one forward+backward, then wait for them, so that no timing shares the host with a compile
    y = fn(*args, DILATIONS, H, W, "row")
    if y.requires_grad:
        y.sum().backward()
    del y
    ahead.wait_all()
    for a in args:
        a.grad = None
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*args, DILATIONS, H, W, "row"), warmup=25, rep=200, return_mode="median")
    y = fn(*args, DILATIONS, H, W, "row")
    dy = torch.randn_like(y)

    def step():
        fn(*args, DILATIONS, H, W, "row").backward(dy)

    return do_bench(step, warmup=25, rep=200, grad_to_none=args, return_mode="median")


def profile_kernels(Bsz=128, D=128, H=56, W=56, dtype=torch.bfloat16) -> list[tuple[str, int, float]]:
    """(kernel, calls, device ms per forward+backward) from torch.profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile

    t = make_inputs(Bsz, D, H, W, dtype, requires_grad=True)
    args = [t[n] for n in NAMES]
    dy = torch.randn(Bsz, H * W, D, device="cuda", dtype=dtype)
    for _ in range(3):  # compile and pick tiles outside the profile
        structure_aware_ssm_fused(*args, DILATIONS, H, W, "row").backward(dy)
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for a in args:  # no gradient accumulation kernels in the profile
                a.grad = None
            structure_aware_ssm_fused(*args, DILATIONS, H, W, "row").backward(dy)
        torch.cuda.synchronize()
    rows = [(e.key, e.count // reps, e.device_time_total / reps / 1e3) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])


def host_overhead(dtype=torch.bfloat16, reps=50, top=18) -> list[tuple[str, float]]:
    """Host (CPU) milliseconds per forward+backward of the fused op at each stage shape — the time the Python
    call takes to queue its kernels; where it exceeds the device time the op is launch-bound — and a
    cProfile of the smallest shape (printed)."""
    import cProfile
    import pstats

    out = []
    for Bsz, D, H, W in SHAPES:
        t = make_inputs(Bsz, D, H, W, dtype, requires_grad=True)
        args = [t[n] for n in NAMES]
        dy = torch.randn(Bsz, H * W, D, device="cuda", dtype=dtype)

        def step():
            for a in args:
                a.grad = None
            structure_aware_ssm_fused(*args, DILATIONS, H, W, "row").backward(dy)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        host_ms = (time.perf_counter() - start) / reps * 1e3
        torch.cuda.synchronize()
        out.append((f"B={Bsz} D={D} {H}x{W}", host_ms))
        if (H, W) == SHAPES[-2][2:]:  # the smallest map: where launch cost matters most
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reps):
                step()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\ncProfile of {reps} forward+backward at B={Bsz} D={D} {H}x{W} (bf16), by own time:")
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    return out


@reports_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stage-1 shape only")
    parser.add_argument("--skip-torch", action="store_true", help="skip the (slow, memory-hungry) reference")
    parser.add_argument("--profile", action="store_true", help="per-kernel device time at stage 1 (bf16)")
    parser.add_argument("--host", action="store_true",
                        help="host (CPU) time per forward+backward at each shape, and a cProfile of the smallest")
    parser.add_argument("--json", default=None, help="write all rows to this file")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s")
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for Bsz, D, H, W in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for name, fn in BACKENDS.items():
                if name == "torch" and args.skip_torch:
                    continue
                row = dict(shape=f"B={Bsz} D={D} {H}x{W}", dtype=str(dtype).split(".")[-1], backend=name)
                for backward in (False, True):
                    key = "fwd_bwd" if backward else "fwd"
                    floor_ms = floor_bytes(Bsz, D, H, W, dtype, backward) / bw * 1e3
                    row[f"{key}_floor_ms"] = floor_ms
                    try:
                        t = make_inputs(Bsz, D, H, W, dtype, requires_grad=backward)
                        ms = bench(fn, t, H, W, backward)
                        row[f"{key}_ms"], row[f"{key}_of_floor"] = ms, floor_ms / ms
                    except torch.OutOfMemoryError:
                        row[f"{key}_ms"], row[f"{key}_of_floor"] = float("nan"), float("nan")
                    finally:
                        t = None
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    kernels = profile_kernels() if args.profile else []
    host = host_overhead() if args.host else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           copy_bandwidth_TBps=bw / 1e12, rows=rows, kernels=kernels, host_ms=host), f, indent=1)
    if host:
        print("\n| shape (fused, bf16) | host ms per forward+backward |")
        print("|---|---:|")
        for shape, ms in host:
            print(f"| {shape} | {ms:.3f} |")
    if kernels:
        print("\n| kernel (fused, bf16, B=128 D=128 56x56, one forward+backward) | calls | device ms |")
        print("|---|---:|---:|")
        for name, calls, ms in kernels:
            print(f"| {name[:90]} | {calls} | {ms:.3f} |")
        print(f"| total | | {sum(k[2] for k in kernels):.3f} |")
    print()
    print(f"| shape | dtype | backend | fwd ms | fwd floor ms | fwd % of floor | fwd+bwd ms | fwd+bwd floor ms "
          f"| fwd+bwd % of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_floor_ms']:.3f} | "
              f"{100 * r['fwd_of_floor']:.0f}% | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_floor_ms']:.3f} | "
              f"{100 * r['fwd_bwd_of_floor']:.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
