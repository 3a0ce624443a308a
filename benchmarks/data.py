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
img per CPU-second = images / CPU seconds those processes used while timed (from /proc): what one busy core
delivers. A per-core img/s above it cannot be real; such a row is flagged INCONSISTENT.

Timing: the workers are started and warmed up first (one batch each), then the timed phase begins with every
worker idle and nothing prefetched and ends at its last batch, so each image counted was decoded inside the
window, whatever the loader did before (start-up, prefetch). Every image is read once per option.
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
    """The encoded file as bytes. Not `torchvision.io.read_file`: its tensor is a private memory map of the file,
    which PyTorch takes for an already shared storage, and sending it from a worker dups the map's file
    descriptor, closed long before: `OSError: [Errno 9] Bad file descriptor` while pickling the storage."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


def collate_bytes(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of encoded files as ONE uint8 tensor and their sizes: one shared-memory storage (one file
    descriptor) per batch instead of one per image."""
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    return data, torch.tensor([len(b) for b in blobs], dtype=torch.int64)


def split_bytes(batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    data, sizes = batch
    return list(torch.split(data, sizes.tolist()))


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

    def __call__(self, encoded: list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2 import functional as TF

        if isinstance(encoded, tuple):  # (bytes, sizes) from collate_bytes
            encoded = split_bytes(encoded)
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


class _Phases(torch.utils.data.Sampler):
    """Indices of the warm-up phase (`phase = "warm"`: the first `warm` samples) or of the timed phase (the rest)."""

    def __init__(self, warm: int, total: int):
        self.warm, self.total, self.phase = warm, total, "warm"

    def __iter__(self):
        return iter(range(self.warm) if self.phase == "warm" else range(self.warm, self.total))

    def __len__(self):
        return self.warm if self.phase == "warm" else self.total - self.warm


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux /proc), None where unreadable."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state is field 3, utime 14, stime 15
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def measure(dataset: Dataset, batch: int, workers: int, rounds: int, collate=None, step=None,
            pin_memory: bool = False) -> dict:
    """Steady-state img/s of a DataLoader with `workers` processes over `dataset`.

    The workers are started and warmed up first (persistent workers, one batch each: imports, caches), then
    the timed phase starts with every worker idle and nothing prefetched, and ends when the last of its
    `workers × rounds` batches has arrived (and, with `step`, been processed): every image counted was read,
    decoded and augmented inside the timed window. Alongside, the CPU seconds the workers used in that window
    (from /proc): images per worker-CPU-second is what one fully busy core delivers, an upper bound of
    img/s per worker that no timing artefact can inflate."""
    warm, timed = workers * batch, workers * rounds * batch
    if len(dataset) < warm + timed:
        raise ValueError(f"{len(dataset)} images are fewer than the {warm + timed} this measurement needs "
                         f"({workers} workers × (1 warm-up + {rounds} timed) batches of {batch})")
    phases = _Phases(warm, warm + timed)
    loader = DataLoader(dataset, batch_size=batch, sampler=phases, num_workers=workers, drop_last=True,
                        collate_fn=collate, persistent_workers=True, prefetch_factor=2, pin_memory=pin_memory)
    sync = torch.cuda.synchronize if step is not None and torch.cuda.is_available() else (lambda: None)
    for b in loader:  # warm-up phase: starts the workers
        if step is not None:
            step(b)
    sync()
    pids = [w.pid for w in loader._iterator._workers]
    phases.phase = "timed"
    cpu_start, main_start = _cpu_seconds(pids), time.process_time()
    start, seen = time.perf_counter(), 0
    for b in loader:
        out = step(b) if step is not None else b
        seen += len(out[0] if isinstance(out, (tuple, list)) else out)
    sync()
    seconds = time.perf_counter() - start
    cpu_end, main_cpu = _cpu_seconds(pids), time.process_time() - main_start
    del loader  # ends the workers
    if seen != timed:
        raise RuntimeError(f"the timed phase delivered {seen} images, expected {timed}")
    worker_cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return {"images": seen, "seconds": seconds, "img_per_s": seen / seconds, "worker_cpu_s": worker_cpu,
            "main_cpu_s": main_cpu}


def bench(root: str, workers_list: list[int], images: int, size: int, batch: int, options: list[str],
          gpu_device: str = "cuda") -> list[dict]:
    """One row per option × worker count (see the module docstring). `gpu_device`: where gpu-nvjpeg decodes
    and augments ("cpu" runs the same code with torchvision's CPU decoder: a test of its plumbing)."""
    paths = _files(root)
    if not paths:
        raise FileNotFoundError(f"no JPEGs under {root}/train; run `python benchmarks/data.py make --root {root}` first")
    rng = np.random.default_rng(0)
    results = []
    for option in options:
        if option == "gpu-nvjpeg" and gpu_device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{option}: skipped (no CUDA device)", flush=True)
            continue
        for workers in workers_list:
            if workers == 0:
                continue
            # whole rounds (every worker the same number of batches), at least 2; one worker: 1/8 of the images
            wanted = images if workers > 1 else images // 8
            rounds = max(2 if workers > 1 else 4, -(-wanted // (workers * batch)))
            need = workers * (1 + rounds) * batch
            if need > len(paths):
                print(f"{option:11s} workers {workers:3d}: skipped, needs {need} images, {root}/train has "
                      f"{len(paths)}", flush=True)
                continue
            subset = [paths[i] for i in rng.permutation(len(paths))[:need]]  # each image read once
            collate, step = None, None
            if option == "pil-timm":
                dataset = _Decode(subset, _timm_train(size))
            elif option == "pil-decode":
                dataset = _Decode(subset, None)
            elif option == "tv-cpu":
                dataset = _TensorDecode(subset, _v2_train(size))
            elif option == "gpu-nvjpeg":
                dataset, collate, step = _Bytes(subset), collate_bytes, GPUAugment(size, gpu_device)
            else:
                raise ValueError(f"unknown option {option!r}")
            m = measure(dataset, batch, workers, rounds, collate, step,
                        pin_memory=torch.cuda.is_available() and option != "gpu-nvjpeg")
            rate = m["img_per_s"]
            cores = workers + (1 if option == "gpu-nvjpeg" else 0)  # the GPU option decodes in the main process
            cpu = m["worker_cpu_s"] + (m["main_cpu_s"] if option == "gpu-nvjpeg" else 0.0) if m["worker_cpu_s"] else None
            per_cpu_s = m["images"] / cpu if cpu else None
            row = {"option": option, "workers": workers, "img_per_s": round(rate, 1),
                   "img_per_s_per_core": round(rate / cores, 1),
                   "img_per_cpu_s": round(per_cpu_s, 1) if per_cpu_s else None,
                   "images": m["images"], "seconds": round(m["seconds"], 3), "size": size}
            # a core cannot deliver more than it decodes per CPU-second: a per-core rate above that is a timing error
            row["consistent"] = per_cpu_s is None or rate / cores <= 1.1 * per_cpu_s
            results.append(row)
            print(f"{option:11s} workers {workers:3d}: {rate:8.1f} img/s, {rate / cores:6.1f} img/s per core, "
                  f"{per_cpu_s or float('nan'):6.1f} img per CPU-second ({m['images']} images in {m['seconds']:.2f} s)"
                  + ("" if row["consistent"] else "  INCONSISTENT: more img/s per core than per CPU-second"),
                  flush=True)
    return results


def markdown(results: list[dict], root: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"Input pipeline, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}, "
             f"{len(_files(root))} generated JPEGs, crop {results[0]['size'] if results else '?'}:", "",
             "| option | workers | img/s | img/s per core | img per CPU-second |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['option']} | {r['workers']} | {r['img_per_s']:.0f} | {r['img_per_s_per_core']:.0f} | "
              f"{r['img_per_cpu_s'] or float('nan'):.0f} |" for r in results]
    return "\n".join(lines)


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
