"""Where does a training step's time go? Profiles a few training steps of a backbone on the GPU and prints
the top kernels by total device time.

    python benchmarks/profile_step.py --model t --backend fused --compile --batch 128
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.errors import reports_user_errors  # noqa: E402
from src.models.spatial_mamba import spatial_mamba_b, spatial_mamba_s, spatial_mamba_t  # noqa: E402

FACTORIES = {"t": spatial_mamba_t, "s": spatial_mamba_s, "b": spatial_mamba_b}


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="t")
    p.add_argument("--backend", default="fused")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = FACTORIES[args.model](backend=args.backend).to(device).to(memory_format=torch.channels_last)
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


if __name__ == "__main__":
    sys.exit(main())
