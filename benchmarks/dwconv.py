"""Benchmark of the blocks' depthwise convolutions: the Triton kernels of `src/kernels/dwconv.py` against the plain
path (cuDNN's channels-last depthwise convolution plus PyTorch's residual add or SiLU, autocast's casts), forward
and forward+backward, at the shapes of Spatial-Mamba-T at 224² (batch 128): per stage the positional encodings
(C channels, with the residual) and the SSM's convolution (2·C channels, with the SiLU, reading one half of the
input projection in place). bf16 activations under autocast, fp32 parameters, as in training. Times: the
device time of the kernels per call (`torch.profiler`, mean of 10 calls after a warm-up: a single op's wall time
at these sizes is the host's, not the GPU's); "per step" multiplies each row by the number of such
convolutions in one T step. The tiles are the measured picks on Hopper GPUs (bf16), else timed first if the
tuning cache has none for a shape (`tuning.py`; `SPATIAL_MAMBA_TUNE=1 SPATIAL_MAMBA_TUNE_LOG=1` times and prints
every candidate).

    PYTHONPATH=. python benchmarks/dwconv.py [--batch 128]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

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


def timed(fn, x, conv, leaves, silu: bool, backward: bool, reps: int = 10) -> float:
    """Device ms of the kernels of one call (forward, or forward+backward)."""
    dy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, conv, not silu, silu)
        if backward:
            torch.autograd.grad(y, leaves, dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in events) / reps / 1e3


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/dwconv.py times GPU kernels; no CUDA GPU is visible")
    torch.backends.cudnn.benchmark = True
    kernel = lambda x, conv, residual, silu: depthwise_conv(x, conv, residual, silu)  # noqa: E731
    plain = lambda x, conv, residual, silu: plain_depthwise_conv(x, conv, residual, silu)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, bf16 autocast; device ms of the kernels per call")
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
    print(f"per T training step (54 convolutions, forward+backward): plain {totals['plain']:.2f} ms, "
          f"Triton {totals['kernel']:.2f} ms")


if __name__ == "__main__":
    main()
