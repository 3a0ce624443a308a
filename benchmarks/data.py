"""Input-pipeline throughput: JPEG decode + the training augmentation, per option, in img/s and img/s per CPU core.

    python benchmarks/data.py make  --root /tmp/imagefolder [--classes 100 --train-per-class 130 --val-per-class 20]
    python benchmarks/data.py bench --root /tmp/imagefolder [--workers 1 16 --images 3000]

`make` writes an ImageNet-like class-folder set from real photographs that ship with scikit-learn
(`load_sample_images`: china.jpg and flower.jpg, 640×427): random crops, flips and colour shifts, rescaled to
ImageNet's size distribution (short side ~ 330–500 px, aspect 3:4 to 16:9), JPEG quality 90 — no download.

Options of `bench` (each runs the published training augmentation or the closest available equivalent):
  pil-timm        PIL decode + timm create_transform (RandomResizedCrop bicubic, flip, RandAugment
                  rand-m9-mstd0.5-inc1, normalize, random erasing 0.25) in DataLoader workers — what
                  ImageFolderDataModule runs; the exact published recipe.
  pil-decode      PIL decode + RGB conversion only (the decode share of pil-timm).
  tv-cpu          torchvision.io.decode_jpeg (libjpeg-turbo) on uint8 tensors + torchvision.transforms.v2
                  (RandomResizedCrop bicubic, flip, RandAugment m9, normalize, erasing) in workers;
                  torchvision's RandAugment is close to, not identical with, timm's policy.
  gpu-nvjpeg      workers only read file bytes; the main process decodes the batch on the GPU
                  (torchvision.io.decode_jpeg(device="cuda"), nvJPEG) and augments there
                  (per-image RandomResizedCrop bicubic + flip, RandAugment per group of 16 images,
                  normalize, per-image erasing). Needs CUDA; approximate recipe like tv-cpu.
img/s per core = img/s / CPU processes used (workers; + 1 for the main process of gpu-nvjpeg).

`ThroughputPrinter` (a Lightning callback, used by benchmarks/gpu_input_pipeline.sh) prints training img/s per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- the folder
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # two (427, 640, 3) uint8 photographs


def _write_image(task: tuple[str, int]) -> None:
    from PIL import Image, ImageEnhance

    path, seed = task
    rng = np.random.default_rng(seed)
    photo = _PHOTOS[seed % len(_PHOTOS)]
    h, w = photo.shape[:2]
    area = rng.uniform(0.3, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9)))
    ch, cw = min(h, int(np.sqrt(area / aspect))), min(w, int(np.sqrt(area * aspect)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    short = rng.integers(330, 501)  # ImageNet: mostly 500×375 / 375×500 and similar
    scale = short / min(img.size)
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img.save(path, quality=90)


def _init_worker():
    global _PHOTOS
    _PHOTOS = _photos()


def make_folder(root: str, classes: int, train_per_class: int, val_per_class: int, processes: int) -> None:
    tasks = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                tasks.append((os.path.join(folder, f"{split}_{c:04d}_{i:05d}.JPEG"), (split == "val") * 10**9 + c * 100_003 + i))
    start = time.time()
    with Pool(processes, initializer=_init_worker) as pool:
        pool.map(_write_image, tasks, chunksize=64)
    size = sum(os.path.getsize(t[0]) for t in tasks[:500]) / min(500, len(tasks))
    print(f"wrote {len(tasks)} JPEGs ({classes} classes, {train_per_class} train + {val_per_class} val each, "
          f"mean {size / 1024:.0f} KB) to {root} in {time.time() - start:.1f} s with {processes} processes")


# ---------------------------------------------------------------- the options
def _files(root: str) -> list[str]:
    train = os.path.join(root, "train")
    return sorted(os.path.join(d, f) for d, _, names in os.walk(train) for f in names if f.endswith(".JPEG"))


class _Decode(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else np.asarray(img).shape[0]


class _TensorDecode(Dataset):
    """torchvision.io.decode_jpeg on the CPU, then a v2 transform on the uint8 (3, H, W) tensor."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        return self.transform(decode_jpeg(read_file(self.paths[i]), mode=ImageReadMode.RGB))


class _Bytes(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import read_file

        return read_file(self.paths[i])


def _v2_train(size: int):
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
        v2.RandomErasing(p=0.25, value="random"),
    ])


def _timm_train(size: int):
    from src.data.imagefolder import ImageFolderDataModule

    return ImageFolderDataModule(root=".", image_size=size).train_transform()


class GPUAugment:
    """Decode a list of JPEG byte tensors on the GPU and apply the training augmentation there."""

    def __init__(self, size: int, device: str = "cuda", group: int = 16):
        from torchvision.transforms import v2

        self.size, self.device, self.group = size, device, group
        self.rand_augment = v2.RandAugment(num_ops=2, magnitude=9)
        self.erase = v2.RandomErasing(p=0.25, value="random")
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def __call__(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2 import functional as TF

        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)  # list of (3, H, W) uint8
        crops = []
        for img in images:
            top, left, height, width = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            img = TF.resized_crop(img, top, left, height, width, [self.size, self.size],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
            crops.append(TF.horizontal_flip(img) if torch.rand(()) < 0.5 else img)
        batch = torch.stack(crops)  # (B, 3, S, S) uint8
        batch = torch.cat([self.rand_augment(g) for g in batch.split(self.group)])
        batch = (batch.float() / 255 - self.mean) / self.std
        return torch.stack([self.erase(img) for img in batch])


def _rate(loader, images: int, warmup_batches: int = 2, step=None) -> float:
    it = iter(loader)
    for _ in range(warmup_batches):
        batch = next(it)
        if step is not None:
            step(batch)
    seen, start = 0, time.perf_counter()
    for batch in it:
        out = step(batch) if step is not None else batch
        seen += len(out)
        if seen >= images:
            break
    if step is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench(root: str, workers_list: list[int], images: int, size: int, batch: int, options: list[str]) -> list[dict]:
    paths = _files(root)
    if not paths:
        raise FileNotFoundError(f"no JPEGs under {root}/train; run `python benchmarks/data.py make --root {root}` first")
    rng = np.random.default_rng(0)
    results = []
    for option in options:
        if option == "gpu-nvjpeg" and not torch.cuda.is_available():
            print(f"{option}: skipped (no CUDA device)", flush=True)
            continue
        for workers in workers_list:
            if workers == 0:
                continue
            n = min(len(paths), images if workers > 1 else max(batch * 4, images // 8))
            subset = [paths[i] for i in rng.permutation(len(paths))[: n + 3 * batch]]
            collate, step = None, None
            if option == "pil-timm":
                dataset = _Decode(subset, _timm_train(size))
            elif option == "pil-decode":
                dataset = _Decode(subset, None)
            elif option == "tv-cpu":
                dataset = _TensorDecode(subset, _v2_train(size))
            elif option == "gpu-nvjpeg":
                dataset, collate, step = _Bytes(subset), list, GPUAugment(size)
            else:
                raise ValueError(f"unknown option {option!r}")
            loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False, drop_last=True,
                                collate_fn=collate, persistent_workers=False, prefetch_factor=4,
                                pin_memory=torch.cuda.is_available() and option != "gpu-nvjpeg")
            rate = _rate(loader, n, step=step)
            cores = workers + (1 if option == "gpu-nvjpeg" else 0)
            row = {"option": option, "workers": workers, "img_per_s": round(rate, 1),
                   "img_per_s_per_core": round(rate / cores, 1), "images": n, "size": size}
            results.append(row)
            print(f"{option:11s} workers {workers:3d}: {rate:8.1f} img/s, {rate / cores:6.1f} img/s per core", flush=True)
    return results


def markdown(results: list[dict], root: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"Input pipeline, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}, "
             f"{len(_files(root))} generated JPEGs, crop {results[0]['size'] if results else '?'}:", "",
             "| option | workers | img/s | img/s per core |", "|---|---|---|---|"]
    lines += [f"| {r['option']} | {r['workers']} | {r['img_per_s']:.0f} | {r['img_per_s_per_core']:.0f} |" for r in results]
    return "\n".join(lines)


# ---------------------------------------------------------------- training throughput callback
class ThroughputPrinter(Callback):
    """Prints, per training epoch, images/s over the steps after `warmup_steps` (compilation, first batches)
    and the share of that time spent waiting for data."""

    def __init__(self, warmup_steps: int = 10):
        self.warmup_steps = warmup_steps

    def on_train_epoch_start(self, trainer, pl_module):
        self.step, self.images, self.wait, self.start, self.last_end = 0, 0, 0.0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.last_end is not None and self.step > self.warmup_steps:
            self.wait += now - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step += 1
        now = time.perf_counter()
        if self.step == self.warmup_steps:
            self.start = now
        elif self.step > self.warmup_steps:
            self.images += len(batch[0]) * trainer.world_size
        self.last_end = now

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        if self.start is None or self.images == 0:
            print(f"epoch {trainer.current_epoch}: fewer than {self.warmup_steps} steps, no throughput figure", flush=True)
            return
        seconds = self.last_end - self.start
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"THROUGHPUT epoch {trainer.current_epoch}: {self.images / seconds:.0f} img/s training "
              f"({self.images} images in {seconds:.1f} s after {self.warmup_steps} warm-up steps), "
              f"data wait {100 * self.wait / seconds:.1f} %, peak GPU memory {memory:.1f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write the JPEG class-folder set")
    make.add_argument("--root", required=True)
    make.add_argument("--classes", type=int, default=100)
    make.add_argument("--train-per-class", type=int, default=130)
    make.add_argument("--val-per-class", type=int, default=20)
    make.add_argument("--processes", type=int, default=os.cpu_count())
    run = sub.add_parser("bench", help="measure decode + augmentation throughput")
    run.add_argument("--root", required=True)
    run.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count()])
    run.add_argument("--images", type=int, default=3000, help="images timed per option at the largest worker count")
    run.add_argument("--size", type=int, default=224)
    run.add_argument("--batch", type=int, default=128)
    run.add_argument("--options", nargs="+", default=["pil-timm", "pil-decode", "tv-cpu", "gpu-nvjpeg"])
    run.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.command == "make":
        make_folder(args.root, args.classes, args.train_per_class, args.val_per_class, args.processes)
        return
    torch.set_num_threads(1)  # workers are the parallelism
    results = bench(args.root, args.workers, args.images, args.size, args.batch, args.options)
    print()
    print(markdown(results, args.root))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
