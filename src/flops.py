"""Parameter and MAC counts of any backbone: `python main.py flops [--config FILE] [--image_size N]`.

MACs of convolutions and matrix products come from `torch.utils.flop_counter.FlopCounterMode` (its FLOPs
/ 2), run on the `torch` backend; the selective scan adds 7·L·D·N operations per block (the formula the
paper's FLOP counts use), reported separately.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def scan_ops(model: nn.Module, image_size: int) -> int:
    """7·L·D·N per SSM block for one image of image_size × image_size (stage i has stride 2^(i+2)). The SSM blocks
    are recognised by their state size and width (`d_state`, `d_inner`) inside the backbone's `stages`: this
    module imports nothing of the project, so that everything may import it."""
    total = 0
    for i, stage in enumerate(getattr(model, "stages", None) or []):
        side = -(-image_size // 2 ** (i + 2))
        for m in stage.modules():
            if hasattr(m, "d_state") and hasattr(m, "d_inner"):
                total += 7 * side * side * m.d_inner * m.d_state
    return total


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> int:
    """Multiply-accumulates of convolutions and matrix products for one image (torch backend)."""
    backends = {}
    if hasattr(model, "set_backend"):
        backends = {m: m.backend for m in model.modules() if hasattr(m, "backend")}
        model.set_backend("torch")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for m, backend in backends.items():
            m.backend = backend
    return counter.get_total_flops() // 2


def describe(model: nn.Module, image_size: int = 224) -> dict[str, float]:
    in_chans = getattr(model, "in_chans", 3)
    return {
        "params": count_params(model),
        "gmacs": count_macs(model, image_size, in_chans) / 1e9,
        "scan_gops": scan_ops(model, image_size) / 1e9,
    }


def flops_main(argv: list[str], cli) -> None:
    parser = argparse.ArgumentParser(prog="main.py flops", add_help=False)
    parser.add_argument("--image_size", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    built = cli(rest, run=False)
    model = getattr(built.model, "backbone", built.model)
    size = known.image_size or getattr(getattr(built.datamodule, "hparams", None), "image_size", None) or 224
    info = describe(model, size)
    print(f"{type(model).__name__} at {size}×{size}:")
    print(f"  parameters          {info['params']:,}")
    print(f"  conv+matmul GMACs   {info['gmacs']:.3f}")
    print(f"  scan GOPs (7·L·D·N) {info['scan_gops']:.3f}")
