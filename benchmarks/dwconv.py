"""Benchmark of the blocks' depthwise convolutions: the Triton kernels of `src/kernels/dwconv.py` against the plain
path (cuDNN's channels-last depthwise convolution plus PyTorch's residual add or SiLU, autocast's casts), forward
and forward+backward, at the shapes of Spatial-Mamba-T at 224² (batch 128): per stage the positional encodings
(C channels, with the residual) and the SSM's convolution (2·C channels, with the SiLU, reading one half of the
input projection in place). bf16 activations under autocast, fp32 parameters, as in training. Times: median of
`triton.testing.do_bench`; "per step" multiplies each row by the number of such convolutions in one T step.

    PYTHONPATH=. python benchmarks/dwconv.py [--batch 128] [--profile]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
from triton.testing import do_bench

from src.errors import reports_user_errors
from src.kernels import plain_depthwise_conv
from src.kernels.dwconv import depthwise_conv

STAGES = [(64, 56, 2), (128, 28, 4), (256, 14, 8), (512, 7, 4)]  # T: (channels, map side, blocks)


def case(Bsz: int, C: int, side: int, silu: bool):
    """(x, conv, leaves): x as the block hands it over (the SSM's: one half of a (B, H, W, 2C) projection)."""
    conv = nn.Conv2d(C, C, 3, padding=1, groups=C).cuda()
    if silu:
        xx = torch.randn(Bsz, side, side, 2 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x = xx[..., :C]
    else:
        xx = x = torch.randn(Bsz, side, side, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return x, conv, [xx, conv.weight, conv.bias]


def timed(fn, x, conv, leaves, silu: bool, backward: bool) -> float:
    dy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, conv, not silu, silu)
        if backward:
            torch.autograd.grad(y, leaves, dy)

    return do_bench(step, warmup=10, rep=50, return_mode="median")


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="also list the kernels of one forward+backward per row")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/dwconv.py times GPU kernels; no CUDA GPU is visible")
    torch.backends.cudnn.benchmark = True
    kernel = lambda x, conv, residual, silu: depthwise_conv(x, conv, residual, silu)  # noqa: E731
    plain = lambda x, conv, residual, silu: plain_depthwise_conv(x, conv, residual, silu)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, bf16 autocast; ms (median)")
    print("| stage | conv | channels | map | plain fwd | Triton fwd | plain fwd+bwd | Triton fwd+bwd | ratio fwd+bwd |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"plain": 0.0, "kernel": 0.0}
    for i, (C, side, blocks) in enumerate(STAGES):
        for silu in (False, True):
            ch = 2 * C if silu else C
            x, conv, leaves = case(args.batch, ch, side, silu)
            t = {name: [timed(fn, x, conv, leaves, silu, bwd) for bwd in (False, True)]
                 for name, fn in (("plain", plain), ("kernel", kernel))}
            per_step = blocks * (1 if silu else 2)  # two positional encodings and one SSM convolution per block
            for name in totals:
                totals[name] += per_step * t[name][1]
            print(f"| {i + 1} | {'SSM + SiLU' if silu else 'cpe + residual'} | {ch} | {side}² | {t['plain'][0]:.3f} | "
                  f"{t['kernel'][0]:.3f} | {t['plain'][1]:.3f} | {t['kernel'][1]:.3f} | "
                  f"{t['plain'][1] / t['kernel'][1]:.2f} |", flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    timed(kernel, x, conv, leaves, silu, True)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
    print(f"per T training step (54 convolutions, forward+backward): plain {totals['plain']:.2f} ms, "
          f"Triton {totals['kernel']:.2f} ms")


if __name__ == "__main__":
    main()
