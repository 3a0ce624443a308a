"""Training throughput and peak memory of Mask R-CNN on Spatial-Mamba (the COCO recipe's model) on one GPU.

    PYTHONPATH=. python benchmarks/detection_throughput.py                 # T, 1333×800, batch 2, bf16, fused
    PYTHONPATH=. python benchmarks/detection_throughput.py --variant s --backend triton
    PYTHONPATH=. python benchmarks/detection_throughput.py --cpu           # smoke check: 128×96, 1 step, CPU, float32

A training step = backbone + FPN + RPN + box and mask heads forward with all five losses, backward and a fused
AdamW step (the recipe's model: 80 classes, 1000 proposals per image, 512 sampled RoIs), under bf16 autocast,
eager, on random images holding `--objects` random rectangles each (8) (boxes and masks, random classes). The
images are 1333×800 as the 1× pipeline makes COCO's landscape images (padded to 1344×800). Prints img/s, ms per
step and the peak of allocated GPU memory. Needs no config parser: the model is built directly.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from src.errors import UserError, reports_user_errors
from src.models.detector import Detector
from src.models.spatial_mamba import VARIANTS, SpatialMamba

DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5}  # the recipe's (configs/coco/*.yaml)


def random_batch(batch: int, height: int, width: int, objects: int, classes: int, device: str):
    """A padded batch of random images and, per image, `objects` rectangles as boxes, labels and masks."""
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
    images = torch.zeros(batch, 3, padded_h, padded_w, device=device)
    images[:, :, :height, :width] = torch.randn(batch, 3, height, width, device=device)
    targets = []
    for _ in range(batch):
        x1 = torch.randint(0, width - 64, (objects,))
        y1 = torch.randint(0, height - 64, (objects,))
        w = torch.minimum(torch.randint(16, 400, (objects,)), width - x1)
        h = torch.minimum(torch.randint(16, 400, (objects,)), height - y1)
        boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1).float()
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
            masks[k, b:d, a:c] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, classes + 1, (objects,), device=device),
                        "masks": masks.to(device)})
    sizes = torch.tensor([[height, width]] * batch)
    return images, sizes, targets


@reports_user_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["t", "s", "b"], default="t")
    p.add_argument("--height", type=int, default=None, help="image height (default 800; 96 with --cpu)")
    p.add_argument("--width", type=int, default=None, help="image width (default 1333; 128 with --cpu)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--objects", type=int, default=None, help="annotated objects per image (default 8; 2 with --cpu)")
    p.add_argument("--backend", default="fused")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 0 with --cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 1 with --cpu)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke check of the step, not a benchmark)")
    args = p.parse_args()
    cpu = args.cpu
    height, width = args.height or (96 if cpu else 800), args.width or (128 if cpu else 1333)
    warmup, steps = args.warmup if args.warmup is not None else (0 if cpu else 5), args.steps or (1 if cpu else 20)
    if min(height, width) < 96 or args.batch < 1 or steps < 1 or warmup < 0 or (args.objects or 1) < 1:
        raise UserError(f"--height/--width must be >= 96, --batch, --steps and --objects >= 1, --warmup >= 0; got {height}, "
                        f"{width}, {args.batch}, {steps}, {args.objects}, {warmup}")
    if not cpu and not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU (or --cpu for a smoke check)")
    device = "cpu" if cpu else "cuda"
    backend = "torch" if cpu else args.backend
    name = {"t": "tiny", "s": "small", "b": "base"}[args.variant]
    torch.manual_seed(0)
    arch = {k: v for k, v in VARIANTS[name].items() if k != "drop_path_rate"}
    backbone = SpatialMamba(num_classes=0, features_only=True, out_indices=[0, 1, 2, 3], backend=backend,
                            drop_path_rate=DROP_PATH[name], **arch)
    model = Detector(backbone, num_classes=80).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=not cpu)
    objects = args.objects or (2 if cpu else 8)
    images, sizes, targets = random_batch(args.batch, height, width, objects, 80, device)

    def step():  # bf16 autocast on the GPU; float32 on the CPU, where bf16 convolutions are many times slower
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not cpu):
            _, losses = model(images, sizes, targets)
            loss = sum(losses.values())
        model.backward(loss)  # as Lightning's step: on the training thread (src/backward.py)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if not cpu:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    where = "CPU" if cpu else f"peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB ({torch.cuda.get_device_name()})"
    print(f"Mask R-CNN + Spatial-Mamba-{args.variant.upper()}, {width}×{height}, batch {args.batch}, "
          f"{'float32' if cpu else 'bf16 autocast'}, "
          f"{backend}, eager: {args.batch / seconds:.2f} img/s train, {seconds * 1e3:.1f} ms/step, {where}")


if __name__ == "__main__":
    sys.exit(main())
