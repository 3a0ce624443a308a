"""Training throughput and peak memory of UperNet on Spatial-Mamba (the ADE20K recipe's model) on one GPU.

    PYTHONPATH=. python benchmarks/segmentation_throughput.py                 # T, 512×512, batch 8, bf16, fused
    PYTHONPATH=. python benchmarks/segmentation_throughput.py --variant s --batch 4

A training step = backbone + UperNet + auxiliary FCN head forward, both cross-entropy losses (0.4 × auxiliary),
backward and a fused AdamW step, under bf16 autocast, on random images and labels (150 classes); eager mode,
channels-last images. Prints img/s, ms per step and the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from src.errors import UserError, reports_user_errors
from src.models.segmenter import SemanticSegmenter
from src.models.spatial_mamba import VARIANTS, SpatialMamba

DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5}  # the recipe's (configs/ade20k/*.yaml)


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["t", "s", "b"], default="t")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backend", default="fused")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    name = {"t": "tiny", "s": "small", "b": "base"}[args.variant]
    torch.manual_seed(0)
    arch = {k: v for k, v in VARIANTS[name].items() if k != "drop_path_rate"}
    backbone = SpatialMamba(num_classes=0, features_only=True, out_indices=[0, 1, 2, 3], backend=args.backend,
                            drop_path_rate=DROP_PATH[name], **arch)
    model = SemanticSegmenter(backbone, num_classes=150).cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, fused=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 150, (args.batch, args.size, args.size), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            features = model.backbone(x)
            loss = model._loss(model.decode_head(features), y)
            loss = loss + model.hparams.aux_weight * model._loss(model.aux_head(features[model.hparams.aux_index]), y)
        model.backward(loss)  # as Lightning's step: on the training thread (src/backward.py)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    print(f"UperNet + Spatial-Mamba-{args.variant.upper()}, {args.size}×{args.size}, batch {args.batch}, bf16 autocast, "
          f"{args.backend}, eager: {args.batch / seconds:.1f} img/s train, {seconds * 1e3:.1f} ms/step, peak "
          f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    sys.exit(main())
