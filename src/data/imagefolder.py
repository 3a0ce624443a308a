"""ImageNet-style class folders: `root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`.

The published augmentation comes from timm (`create_transform`: RandomResizedCrop, flip, RandAugment,
random erasing; test: resize → center crop). What this module adds around it:

- exact resume: the shuffle order of epoch e depends only on (seed, e), every sample's augmentation is
  seeded by (seed, epoch, index), and the train loader can start part-way through an epoch, so a run
  resumed from a mid-epoch checkpoint sees the same images, augmented the same way, as one that never
  stopped; the number of samples to skip comes from the trainer's own (restored) batch progress;
- distributed sampling without padding for evaluation, so a metric over N GPUs is the metric over the
  whole validation set, not over a set padded with repeats;
- bad data: missing folders, empty classes and train/val class mismatches are one-line errors;
  unreadable images (corrupt, truncated) are logged and replaced by the next readable one (or raise,
  `on_bad_image: error`); grayscale, CMYK, palette and RGBA images are converted to RGB (16-bit ones scaled,
  not clipped); class folders are walked following links, each folder and file once;
- `decoder: torchvision`: files decoded by torchvision.io and the same augmentation run on uint8 tensors
  (`tensor_transform`, src/data/tensor_augment.py), cheaper per image than PIL + timm; the default stays
  PIL + timm;
- the class names are saved in every checkpoint (`state_dict`) and restored with it, so `predict` names
  classes without the training folder.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.checks import increasing_pair, non_negative, probability, require
from src.data.sharded import ShardedDataModule
from src.data.tensor_augment import pil_transform, tensor_transform
from src.errors import DataError, InputNotFoundError, NotWritableError, OutputExistsError, UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_output_file(path: str, overwrite: bool, key: str, overwrite_flag: str) -> None:
    """Refuse, before any work, an output path that would lose data or fail at the end: an existing file
    (unless `overwrite`), a folder, or a location that cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"{key} {path!r} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{key} {path!r} exists and would be overwritten; pass {overwrite_flag} "
                                "or choose another file")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise NotWritableError(f"{key} {path!r} cannot be written ({existing!r} is not a writable folder)")


def check_data_root(root: str | None, holding: str, example: str, expected: str) -> None:
    """Refuse, before any work, a data folder that is not set or does not exist, naming what it should hold:
    `holding` ("the folder holding train/ and val/"), an `example` path, the `expected` files under it."""
    if root is None:
        raise UserError(f"data.init_args.root is not set: give {holding} (--data.init_args.root {example})")
    if not os.path.isdir(root):
        raise InputNotFoundError(f"data.root not found: {root!r} (expected {expected})")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def walk_images(folder: str) -> list[str]:
    """Sorted image paths under `folder` at any depth, following symlinks to folders, each file once: a folder
    already walked (a symlink loop, or a second link to it) is not entered again, and files are told apart by
    their real path (two links to one image count once)."""
    paths, seen_folders, seen_files = [], set(), set()
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_folders:
            dirnames[:] = []
            continue
        seen_folders.add((st.st_dev, st.st_ino))
        dirnames.sort()  # walk order decides which of two links to one file is kept: make it the sorted one
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if _is_image(name) and os.path.realpath(path) not in seen_files:
                seen_files.add(os.path.realpath(path))
                paths.append(path)
    return sorted(paths)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit integer images (16-bit PNG and TIFF: modes I;16*, and I read as 16-bit) are scaled
    from 0..65535 to 0..255; Pillow's own conversion clips them at 255, which turns most pixels white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.asarray(img).astype(np.float32) * (255 / 65535)  # (H, W)
        img = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


# ---- the torchvision decoder: torchvision.io decode (its augmentation: src/data/tensor_augment.py) ----
DECODERS = ("pil", "torchvision")
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # decoded by torchvision.io; the rest by PIL


def read_rgb_pil(path: str) -> Image.Image:
    """The image at `path` as 8-bit RGB, decoded fully (truncated files fail here)."""
    with Image.open(path) as img:
        return to_rgb(img)


def read_rgb_tensor(path: str) -> torch.Tensor:
    """The image at `path` as a (3, H, W) uint8 RGB tensor, decoded by torchvision.io (libjpeg-turbo, libpng,
    libwebp; grayscale, CMYK, palette and alpha images come out RGB, as from `to_rgb`).

    PIL decodes instead (then `to_rgb`, so the pixels are the PIL path's) what torchvision.io cannot decode the
    same way: other formats (BMP, TIFF, PPM), 16-bit PNGs (torchvision gives uint16; PIL's path scales
    grayscale ones and reads RGB ones by their high byte), and any file torchvision refuses, so that PIL decides
    what is unreadable and both decoders accept and reject the same files."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    if path.lower().endswith(TORCHVISION_EXTENSIONS):
        try:
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
            if img.dtype == torch.uint8:
                return img
        except RuntimeError:  # not decodable by torchvision: PIL's verdict below
            pass
    return torch.from_numpy(np.array(read_rgb_pil(path))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def scan_class_folders(folder: str) -> tuple[list[str], list[list[str]]]:
    """Sorted class names under `folder` and, per class, the sorted image paths inside it (recursively)."""
    if not os.path.isdir(folder):
        raise InputNotFoundError(
            f"image folder not found: {folder!r} (expected <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG)"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InputNotFoundError(f"no class folders in {folder!r} (expected {folder}/<class>/*.JPEG)")
    files = []
    for name in classes:
        paths = walk_images(os.path.join(folder, name))
        if not paths:
            raise UserError(
                f"class folder {os.path.join(folder, name)!r} has no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                "remove it or add images"
            )
        files.append(paths)
    return classes, files


def scan_images(folder: str) -> list[str]:
    """Sorted image paths anywhere under `folder` (for predict)."""
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"data.predict_root not found: {folder!r}")
    paths = walk_images(folder)
    if not paths:
        raise UserError(f"data.predict_root {folder!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return paths


class _SeededRNG:
    """Seeds Python's, NumPy's and torch's CPU generators for one sample and restores them afterwards, so
    a sample's augmentation depends only on its seed (not on the worker, the worker count, or what ran
    before) and loading in the main process (num_workers=0) leaves the training RNG stream untouched."""

    def __init__(self, *key: int):
        self.seeds = np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(3)

    def __enter__(self):
        self.saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(int(self.seeds[0]))
        np.random.seed(int(self.seeds[1]))
        torch.default_generator.manual_seed(int(self.seeds[2]))  # CPU only: CUDA generators stay as they are

    def __exit__(self, *exc):
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


class ImageFolderDataset(Dataset):
    """Images and labels from lists of paths; `dataset[(index, epoch)]` seeds the transform by
    (seed, epoch, index) (what `ResumableSampler` yields); `dataset[index]` does not seed. `decoder` "pil"
    hands the transform PIL images (`read_rgb_pil`), "torchvision" (3, H, W) uint8 tensors (`read_rgb_tensor`).

    Paths are held in one NumPy byte array (not a list of str) so that forked workers do not copy
    them page by page through reference counting (1.28 M paths for ImageNet)."""

    def __init__(self, paths: list[str], labels: list[int], transform: Callable | None = None, seed: int = 0,
                 on_bad_image: str = "skip", max_bad_in_a_row: int = 50, decoder: str = "pil"):
        self.paths = np.array([p.encode() for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform, self.seed, self.on_bad_image, self.max_bad = transform, seed, on_bad_image, max_bad_in_a_row
        self.read = {"pil": read_rgb_pil, "torchvision": read_rgb_tensor}[decoder]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        """The RGB image at `index`, or (on_bad_image=skip) the next readable one after it."""
        for attempt in range(self.max_bad):
            i = (index + attempt) % len(self)
            path = self.paths[i].decode()
            try:
                return self.read(path), i
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise DataError(f"unreadable image {path!r}: {e} (data.init_args.on_bad_image skip "
                                    "uses the next readable image instead)") from None
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        raise DataError(f"{self.max_bad} unreadable images in a row from {self.paths[index].decode()!r}; is the data corrupt?")

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img, i = self.load(index)
        if self.transform is not None:
            if epoch is None:
                img = self.transform(img)
            else:
                with _SeededRNG(self.seed, epoch, index):
                    img = self.transform(img)
        return img, int(self.labels[i])


class PredictDataset(Dataset):
    """Images of a folder (any depth) for `predict`: (image, path)."""

    def __init__(self, paths: list[str], transform: Callable, decoder: str = "pil"):
        self.images = ImageFolderDataset(paths, [0] * len(paths), transform, on_bad_image="error", decoder=decoder)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index][0], self.images.paths[index].decode()


class ImageFolderDataModule(ShardedDataModule):
    """ImageNet-style class folders with the published augmentation (timm), for one or many GPUs.

    Args:
        root: folder holding `train/` and `val/` (each with one sub-folder of images per class); needed by
            fit, validate and test (predict takes class names from the checkpoint).
        batch_size: images per GPU per step (global batch = batch_size × devices × nodes × accumulation).
        val_batch_size: images per GPU per validation step (None: 2 × batch_size).
        image_size: training crop and test crop side (a multiple of 32).
        num_workers: DataLoader worker processes per GPU (decoding + augmentation run there); null: the CPUs
            this process may use ÷ the devices of this node, minus one (the ImageNet recipe's choice).
        pin_memory: page-locked host batches (faster copies to the GPU).
        persistent_workers: keep workers alive between epochs.
        prefetch_factor: batches loaded ahead by each worker (None: PyTorch's default, 2).
        train_dir: sub-folder of root with training classes.
        val_dir: sub-folder of root with validation classes (the same class names).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability.
        auto_augment: timm auto-augment policy string ("rand-m9-mstd0.5-inc1" = RandAugment m9; None: off).
        color_jitter: colour-jitter strength (timm turns it off while RandAugment is on, as in the
            published recipe; it applies with auto_augment None).
        re_prob: random-erasing probability.
        re_mode: random-erasing fill: "pixel" (per-pixel normal noise), "rand" (per channel) or "const".
        re_count: random-erasing boxes per image.
        interpolation: resize interpolation of train and test ("bicubic", "bilinear", ...).
        crop_pct: test: resize the short side to image_size / crop_pct, then center-crop image_size.
        mean: normalisation mean (RGB, 0..1).
        std: normalisation std (RGB, 0..1).
        seed: seed of the shuffle order and of every sample's augmentation (None: the run's seed_everything).
        on_bad_image: "skip" (log the path and use the next readable image) or "error" (a one-line data error).
        decoder: "pil" (PIL decode + timm's transforms: the published recipe) or "torchvision" (fewer CPU seconds
            per image; `benchmarks/data.py bench` measures it): files decoded by torchvision.io (libjpeg-turbo; PIL for
            other formats and 16-bit PNGs, and to judge files torchvision refuses), the same transforms on uint8
            tensors (`tensor_transform`): the same crop draws, flip, erasing, normalisation and auto-augment
            policy (ops, probabilities, magnitudes), with torchvision's pixel ops, which differ slightly from
            PIL's (resize filters; rotate/shear/translate of RandAugment bilinear instead of bicubic). Samples
            are seeded alike (exact resume holds); the same seed gives close, not identical, images across the
            two decoders. AugMix policies are refused.
        predict_root: folder of images (any depth) for `predict`.
        predict_output: CSV file written by `predict`: path, class index, class name, probability. Checked
            before any image is predicted: an existing file is refused unless `predict_overwrite` is true; a
            folder, or a folder that cannot be written, is refused. Written atomically (temp file + rename).
        predict_overwrite: replace an existing `predict_output`.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        image_size: int = 224,
        num_workers: int | None = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int | None = None,
        on_bad_image: str = "skip",
        decoder: Literal["pil", "torchvision"] = "pil",
        predict_root: str | None = None,
        predict_output: str = "predictions.csv",
        predict_overwrite: bool = False,
    ):
        super().__init__()
        if image_size < 32 or image_size % 32:
            raise UserError(f"data.image_size must be a multiple of 32 (the backbone's stride), got {image_size}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be positive, got {batch_size}")
        if not 0 < crop_pct <= 1:
            raise UserError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
        if on_bad_image not in ("skip", "error"):
            raise UserError(f"data.on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if decoder not in DECODERS:
            raise UserError(f"data.decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if re_mode not in ("pixel", "rand", "const"):
            raise UserError(f"data.re_mode must be 'pixel', 'rand' or 'const', got {re_mode!r}")
        key = "data.init_args."
        require(val_batch_size is None or val_batch_size >= 1, key + "val_batch_size", ">= 1 or null", val_batch_size)
        if num_workers is not None:
            non_negative(key + "num_workers", num_workers)
        require(prefetch_factor is None or prefetch_factor >= 1, key + "prefetch_factor", ">= 1 or null", prefetch_factor)
        increasing_pair(key + "scale", scale, high=1.0)
        increasing_pair(key + "ratio", ratio)
        for name, value in (("hflip", hflip), ("re_prob", re_prob)):
            probability(key + name, value)
        non_negative(key + "color_jitter", color_jitter)
        non_negative(key + "re_count", re_count)
        require(len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std), key + "mean/std",
                "three numbers each (RGB), std > 0", [list(mean), list(std)])
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.classes: list[str] = []
        self.train_set = self.val_set = self.predict_set = None

    # ---- transforms (timm; on tensors for decoder "torchvision") ----
    def train_transform(self):
        from timm.data import create_transform

        hp = self.hparams
        transform = create_transform(
            hp.image_size, is_training=True, scale=tuple(hp.scale), ratio=tuple(hp.ratio), hflip=hp.hflip,
            color_jitter=hp.color_jitter, auto_augment=hp.auto_augment, interpolation=hp.interpolation,
            re_prob=hp.re_prob, re_mode=hp.re_mode, re_count=hp.re_count, mean=tuple(hp.mean), std=tuple(hp.std),
        )
        return tensor_transform(transform) if hp.decoder == "torchvision" else pil_transform(transform)

    def test_transform(self):
        from timm.data import create_transform

        hp = self.hparams
        transform = create_transform(hp.image_size, is_training=False, interpolation=hp.interpolation,
                                     crop_pct=hp.crop_pct, mean=tuple(hp.mean), std=tuple(hp.std))
        return tensor_transform(transform) if hp.decoder == "torchvision" else transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---- datasets ----
    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict":
            if hp.predict_root is None:
                raise UserError("predict needs data.init_args.predict_root (a folder of images)")
            check_output_file(hp.predict_output, hp.predict_overwrite, "data.init_args.predict_output",
                              "--data.init_args.predict_overwrite true")
            train = os.path.join(hp.root or "", hp.train_dir)
            if not self.classes and hp.root and os.path.isdir(train):  # names from the folder; a checkpoint overrides them
                self.classes = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
            self.predict_set = PredictDataset(scan_images(hp.predict_root), self.test_transform(), hp.decoder)
            return
        if self.val_set is not None:
            return
        check_data_root(hp.root, "the folder holding train/ and val/", "/path/to/imagenet",
                        f"{hp.root}/{hp.train_dir}/<class>/*.JPEG")
        if stage in (None, "fit"):
            classes, files = scan_class_folders(os.path.join(hp.root, hp.train_dir))
            self.classes = classes
            paths = [p for f in files for p in f]
            labels = [c for c, f in enumerate(files) for _ in f]
            self.train_set = ImageFolderDataset(paths, labels, self.train_transform(), self._seed(), hp.on_bad_image,
                                                decoder=hp.decoder)
        val_classes, val_files = scan_class_folders(os.path.join(hp.root, hp.val_dir))
        if not self.classes:
            train = os.path.join(hp.root, hp.train_dir)
            self.classes = (sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
                            if os.path.isdir(train) else val_classes)
        index = {c: i for i, c in enumerate(self.classes)}
        extra = [c for c in val_classes if c not in index]
        if extra:
            raise UserError(
                f"{len(extra)} class folders of {os.path.join(hp.root, hp.val_dir)!r} are not training classes: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''} (train and val need the same class folder names)"
            )
        missing = [c for c in self.classes if c not in set(val_classes)]
        if missing:
            log.warning("%d training classes have no validation folder, e.g. %s", len(missing), missing[:5])
        paths = [p for f in val_files for p in f]
        labels = [index[c] for c, f in zip(val_classes, val_files) for _ in f]
        self.val_set = ImageFolderDataset(paths, labels, self.test_transform(), on_bad_image=hp.on_bad_image,
                                          decoder=hp.decoder)

    # ---- loaders (ShardedDataModule) ----
    def eval_batch_size(self) -> int:
        return self.hparams.val_batch_size or 2 * self.batch_size

    @property
    def train_batch_size(self) -> int:
        return self.batch_size

    # ---- checkpoint ----
    def state_dict(self) -> dict:
        return {"classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        saved = list(state.get("classes", []))
        if self.classes and saved and saved != self.classes and (self.train_set is not None or self.val_set is not None):
            diff = sorted(set(saved) ^ set(self.classes))
            raise UserError(
                f"the checkpoint was trained on {len(saved)} classes, {self.hparams.root!r} has {len(self.classes)}; "
                f"differing names: {diff[:5]}{' ...' if len(diff) > 5 else ''}"
            )
        if saved:
            self.classes = saved
