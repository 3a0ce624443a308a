"""Where does a training step's time go? Profiles a few training steps of a backbone on the GPU and prints
the top kernels by total device time, then the wall time of a step measured without the profiler: a wall time
well above the kernels' sum means the GPU waits for the host (launch-bound or synchronising).

    python benchmarks/profile_step.py --model t --backend fused --compile --batch 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.errors import reports_user_errors  # noqa: E402
from src.timing import host_issue_s  # noqa: E402
from src.models.spatial_mamba import spatial_mamba_b, spatial_mamba_s, spatial_mamba_t  # noqa: E402

FACTORIES = {"t": spatial_mamba_t, "s": spatial_mamba_s, "b": spatial_mamba_b}


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="t")
    p.add_argument("--backend", default="fused")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused-norms", choices=["on", "off"], default="off",
                   help="the fused backend's LayerNorms as Triton kernels (on) or nn.LayerNorm (off, the default)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    p.add_argument("--cpu-top", type=int, default=0, help="also list this many host-side ops by self CPU time")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = FACTORIES[args.model](backend=args.backend, fused_norms=args.fused_norms == "on")
    model = model.to(device).to(memory_format=torch.channels_last)
    fn = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(fn(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"{args.model} {args.backend} {'compiled' if args.compile else 'eager'} batch {args.batch}: "
          f"{total / 1e3 / args.steps:.1f} ms of kernels per step")
    print(f"{'share':>6} {'ms/step':>8} {'calls':>6}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"{100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / 1e3 / args.steps:8.2f} "
              f"{e.count // args.steps:6d}  {e.key[:110]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    wall_steps = max(10, args.steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(wall_steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / wall_steps
    print(f"wall time per step (no profiler, {wall_steps} steps): {wall * 1e3:.1f} ms = {args.batch / wall:.0f} img/s; "
          f"kernels {total / 1e3 / args.steps:.1f} ms ({100 * total / 1e6 / args.steps / wall:.0f} % of the wall time)")
    # the host's share: from an idle GPU, how long the host takes to issue one step (until step() returns) and
    # how many times the step makes the host wait for the GPU (torch's sync debug mode warns on each)
    issue = host_issue_s(step, device, repeats=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:100] for w in caught  # (less torch's notice that the mode is a prototype)
             if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    print(f"host time to issue one step: {1e3 * issue:.1f} ms (median of 5); "
          f"synchronising calls in a step: {len(syncs)}" + "".join(f"\n  {m}" for m in syncs[:10]))
    if args.cpu_top:
        with profile(activities=[ProfilerActivity.CPU]) as cpu_prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        ops = [e for e in cpu_prof.key_averages() if e.self_cpu_time_total > 0]
        cpu_total = sum(e.self_cpu_time_total for e in ops)
        print(f"host (CPU) time per step under the profiler: {cpu_total / 1e3 / args.steps:.1f} ms; top ops by self time:")
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.cpu_top]:
            print(f"{e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms {e.count // args.steps:6d}  {e.key[:100]}")


if __name__ == "__main__":
    sys.exit(main())
