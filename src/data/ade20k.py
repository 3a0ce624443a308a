"""ADE20K (SceneParsing, ADEChallengeData2016) for semantic segmentation, in its official folder layout:

    root/images/training/ADE_train_00000001.jpg      root/annotations/training/ADE_train_00000001.png
    root/images/validation/ADE_val_00000001.jpg      root/annotations/validation/ADE_val_00000001.png

Annotations are single-channel PNGs of 0..150, 0 = "other" (unlabelled). With `reduce_zero_label` (the
standard protocol) 0 becomes the ignore label 255 and 1..150 become classes 0..149.

Training pipeline (the paper's, mmsegmentation's ADE20K recipe), image and mask transformed together by
torchvision transforms v2 (masks resized with nearest neighbour, padded with the ignore label):
random rescale of (2048, 512) by a ratio in [0.5, 2.0] keeping the aspect ratio → random 512×512 crop in
which no single class covers more than 75 % of the labelled pixels (10 tries) → horizontal flip (0.5) →
photometric distortion → pad to 512×512 → normalise. Test: the image alone rescaled to fit (2048, 512),
the label at its original size (the model resizes its logits to it). Exact resume and unpadded
distributed evaluation come from the ImageNet module's samplers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from src.data.imagefolder import (
    _SeededRNG,
    check_data_root,
    check_output_file,
    scan_images,
)
from src.data.sharded import ShardedDataModule
from src.checks import require, stride_multiple
from src.errors import DataError, InputNotFoundError, OutputExistsError, UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
ADE_MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics in 0..255
ADE_STD = (58.395, 57.12, 57.375)


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """The size of an image rescaled, aspect ratio kept, as large as fits in `scale` = (long, short) bounds."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class _PairTransform(v2.Transform):
    """v2 transform with parameters drawn once per call and applied to the image and its mask alike.
    torchvision >= 0.21 calls make_params/transform, older versions _get_params/_transform."""

    def _get_params(self, flat_inputs):
        return self.make_params(flat_inputs)

    def _transform(self, inpt, params):
        return self.transform(inpt, params)


def _mask_of(flat_inputs) -> torch.Tensor | None:
    return next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)


class RandomRescale(_PairTransform):
    """Rescale (aspect ratio kept) to fit `scale` × r, r uniform in `ratio_range`."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs) -> dict:
        r = float(torch.empty(()).uniform_(*self.ratio_range))
        h, w = v2.query_size(flat_inputs)
        return {"size": rescale_size(h, w, (self.scale[0] * r, self.scale[1] * r))}

    def transform(self, inpt, params):
        return TF.resize(inpt, list(params["size"]), antialias=True)  # masks: nearest (tv_tensors.Mask)


class RandomCropCatMax(_PairTransform):
    """Random crop of `size` (or the whole side where the image is smaller), drawn again (up to `tries`
    times, the last draw kept) until the crop holds at least two classes and none covers `cat_max_ratio`
    or more of its labelled pixels."""

    def __init__(self, size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index, self.tries = tuple(size), cat_max_ratio, ignore_index, tries

    def make_params(self, flat_inputs) -> dict:
        H, W = v2.query_size(flat_inputs)
        h, w = min(self.size[0], H), min(self.size[1], W)
        mask = _mask_of(flat_inputs)
        for _ in range(self.tries):
            top = int(torch.randint(0, H - h + 1, ()))
            left = int(torch.randint(0, W - w + 1, ()))
            if mask is None or self.cat_max_ratio >= 1:
                break
            crop = mask[..., top:top + h, left:left + w]
            counts = torch.bincount(crop[crop != self.ignore_index].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt, params):
        return TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])


class PadTo(_PairTransform):
    """Pads bottom/right to at least `size`: images with 0, masks with the ignore label."""

    def __init__(self, size: Sequence[int], ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.ignore_index = tuple(size), ignore_index

    def make_params(self, flat_inputs) -> dict:
        H, W = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - W), max(0, self.size[0] - H)]}

    def transform(self, inpt, params):
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return TF.pad(inpt, params["padding"], fill=fill)


class RescaleImage(_PairTransform):
    """Test-time rescale of the image alone (aspect ratio kept) to fit `scale`; the mask keeps its size."""

    def __init__(self, scale: Sequence[int] = (2048, 512)):
        super().__init__()
        self.scale = tuple(scale)

    def make_params(self, flat_inputs) -> dict:
        h, w = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)).shape[-2:]
        return {"size": rescale_size(h, w, self.scale)}

    def transform(self, inpt, params):
        return TF.resize(inpt, list(params["size"]), antialias=True) if isinstance(inpt, tv_tensors.Image) else inpt


class PhotometricDistortion(_PairTransform):
    """Each with probability 0.5: brightness + U(-32, 32) (0..255 scale), contrast × U(0.5, 1.5) (before or
    after the colour changes, at random), saturation × U(0.5, 1.5) (blend with the grey image), hue shifted
    by U(-0.1, 0.1) of the colour circle (±36°). Images only (uint8 in, uint8 out); masks pass unchanged."""

    def __init__(self, brightness_delta: float = 32, contrast: Sequence[float] = (0.5, 1.5),
                 saturation: Sequence[float] = (0.5, 1.5), hue_delta: float = 0.1):
        super().__init__()
        self.brightness_delta, self.contrast, self.saturation, self.hue_delta = (
            brightness_delta, tuple(contrast), tuple(saturation), hue_delta)

    def make_params(self, flat_inputs) -> dict:
        def maybe(lo, hi):
            return float(torch.empty(()).uniform_(lo, hi)) if torch.rand(()) < 0.5 else None

        return {"brightness": maybe(-self.brightness_delta, self.brightness_delta),
                "contrast_first": bool(torch.rand(()) < 0.5), "contrast": maybe(*self.contrast),
                "saturation": maybe(*self.saturation), "hue": maybe(-self.hue_delta, self.hue_delta)}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        x = inpt.float()
        if params["brightness"] is not None:
            x = (x + params["brightness"]).clamp(0, 255)
        if params["contrast_first"] and params["contrast"] is not None:
            x = (x * params["contrast"]).clamp(0, 255)
        if params["saturation"] is not None or params["hue"] is not None:
            y = x / 255
            if params["saturation"] is not None:
                y = TF.adjust_saturation(y, params["saturation"])
            if params["hue"] is not None:
                y = TF.adjust_hue(y, params["hue"])
            x = y * 255
        if not params["contrast_first"] and params["contrast"] is not None:
            x = (x * params["contrast"]).clamp(0, 255)
        return tv_tensors.wrap(x.round().to(torch.uint8), like=inpt)


def load_pair(image_path: str, mask_path: str | None, num_classes: int, reduce_zero_label: bool):
    """RGB image (3, H, W) uint8 and mask (H, W) uint8 of class indices / 255; bad files raise one line."""
    try:
        with Image.open(image_path) as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image {image_path!r}: {e}") from None
    if mask_path is None:
        return torch.from_numpy(image.copy()).permute(2, 0, 1), None
    try:
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"annotation {mask_path!r} is a {m.mode} image; expected a single-channel PNG "
                                "of class indices (mode L or P)")
            mask = np.asarray(m)
    except (OSError, SyntaxError) as e:
        raise DataError(f"unreadable annotation {mask_path!r}: {e}") from None
    if mask.shape != image.shape[:2]:
        raise UserError(f"annotation {mask_path!r} is {mask.shape[1]}×{mask.shape[0]} but its image "
                        f"{image_path!r} is {image.shape[1]}×{image.shape[0]}; they must have the same size")
    highest = num_classes if reduce_zero_label else num_classes - 1
    bad = np.unique(mask[(mask > highest) & (mask != IGNORE_INDEX)])
    if len(bad):
        raise UserError(f"annotation {mask_path!r} has labels {bad[:5].tolist()} outside 0..{highest} "
                        f"(and {IGNORE_INDEX} = ignore) for {num_classes} classes"
                        + (" with reduce_zero_label" if reduce_zero_label else ""))
    mask = mask.astype(np.int64)
    if reduce_zero_label:  # 0 ("other") -> ignore, 1..K -> 0..K-1, 255 stays ignore
        mask = np.where(mask == 0, IGNORE_INDEX + 1, mask) - 1
        mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask.astype(np.uint8))


def scan_pairs(root: str, split: str) -> tuple[list[str], list[str]]:
    """Sorted image paths of root/images/<split> and their annotations root/annotations/<split>/<stem>.png."""
    image_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for folder in (image_dir, ann_dir):
        if not os.path.isdir(folder):
            raise InputNotFoundError(f"ADE20K folder not found: {folder!r} (expected {root}/images/{split}/*.jpg "
                                     f"and {root}/annotations/{split}/*.png)")
    images = sorted(e.path for e in os.scandir(image_dir)
                    if e.name.lower().endswith((".jpg", ".jpeg", ".png")) and not e.name.startswith("."))
    if not images:
        raise InputNotFoundError(f"no images (.jpg) in {image_dir!r}")
    masks = []
    for path in images:
        mask = os.path.join(ann_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if not os.path.isfile(mask):
            raise InputNotFoundError(f"image {path!r} has no annotation: expected {mask!r}")
        masks.append(mask)
    return images, masks


class SegmentationDataset(Dataset):
    """(image, mask) pairs through a paired transform; `dataset[(index, epoch)]` seeds the transform by
    (seed, epoch, index) (what ResumableSampler yields, for exact resume); `dataset[index]` does not."""

    def __init__(self, images: list[str], masks: list[str], transform, num_classes: int, reduce_zero_label: bool,
                 seed: int = 0):
        self.images, self.masks = np.array([p.encode() for p in images]), np.array([p.encode() for p in masks])
        self.transform, self.num_classes, self.reduce_zero_label, self.seed = (
            transform, num_classes, reduce_zero_label, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image, mask = load_pair(self.images[index].decode(), self.masks[index].decode(), self.num_classes,
                                self.reduce_zero_label)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask[None])
        if epoch is None:
            image, mask = self.transform(image, mask)
        else:
            with _SeededRNG(self.seed, epoch, index):
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask[0].as_subclass(torch.Tensor).long()


class PredictImages(Dataset):
    """Images of a folder for `predict`: (image at test scale, original (H, W), path)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image, _ = load_pair(self.paths[index], None, 0, False)
        size = torch.tensor(image.shape[-2:])
        image, _ = self.transform(tv_tensors.Image(image), tv_tensors.Mask(torch.zeros(1, 1, 1, dtype=torch.uint8)))
        return image.as_subclass(torch.Tensor), size, self.paths[index]


class ADE20KDataModule(ShardedDataModule):
    """ADE20K in the official layout (module docstring).

    Args:
        root: folder holding images/ and annotations/ (ADEChallengeData2016).
        batch_size: training crops per device (the paper: 2 × 8 GPUs).
        num_workers: loader processes per device.
        crop_size: training crop (height, width); sides multiples of 32.
        scale: (long, short) bounds of the rescale before cropping and at test time.
        ratio_range: random factor on `scale` for training.
        cat_max_ratio: largest share of one class in a training crop (1: any crop).
        hflip: probability of a horizontal flip.
        photometric: photometric distortion of training images.
        reduce_zero_label: label 0 is "other": ignored; 1..K become 0..K-1.
        num_classes: classes after reduction (150).
        class_names: names of the classes for per-class IoU (default class_000 ...).
        mean: per-channel mean subtracted (0..255 scale).
        std: per-channel std divided by (0..255 scale).
        train_split: folder name of the training split under images/ and annotations/.
        val_split: folder name of the validation split.
        seed: seed of shuffling and augmentation (default: the run's seed_everything).
        pin_memory: page-locked batches for faster GPU copies.
        persistent_workers: keep loader processes between epochs.
        predict_root: folder of images for `predict`.
        predict_output: folder the colourised masks (PNG) are written to, under the inputs' relative names.
        predict_overwrite: allow writing into an existing, non-empty predict_output.
    """

    pixel_scale = 255.0

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 2,
        num_workers: int = 4,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        reduce_zero_label: bool = True,
        num_classes: int = 150,
        class_names: list[str] | None = None,
        mean: tuple[float, float, float] = ADE_MEAN,
        std: tuple[float, float, float] = ADE_STD,
        train_split: str = "training",
        val_split: str = "validation",
        seed: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_root: str | None = None,
        predict_output: str | None = None,
        predict_overwrite: bool = False,
    ):
        super().__init__()
        require(len(crop_size) == 2, "data.crop_size", "(height, width)", list(crop_size))
        stride_multiple("data.crop_size", list(crop_size))
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise UserError(f"data.ratio_range must be (low, high) with 0 < low <= high, got {list(ratio_range)}")
        if not 0 < cat_max_ratio <= 1 or not 0 <= hflip <= 1:
            raise UserError(f"data.cat_max_ratio must be in (0, 1] and hflip in [0, 1], got {cat_max_ratio}, {hflip}")
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(f"data.class_names has {len(class_names)} names for num_classes={num_classes}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.classes = list(class_names) if class_names else [f"class_{c:03d}" for c in range(num_classes)]
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_set = self.val_set = self.predict_set = None

    def _normalise(self) -> list:
        return [v2.ToDtype(torch.float32, scale=False), v2.Normalize(list(self.mean), list(self.std))]

    def train_transform(self) -> v2.Compose:
        hp = self.hparams
        steps = [RandomRescale(hp.scale, hp.ratio_range), RandomCropCatMax(hp.crop_size, hp.cat_max_ratio),
                 v2.RandomHorizontalFlip(hp.hflip)]
        if hp.photometric:
            steps.append(PhotometricDistortion())
        return v2.Compose(steps + [PadTo(hp.crop_size)] + self._normalise())

    def test_transform(self) -> v2.Compose:
        """Whole-image test: the image rescaled to fit `scale`, the mask left at its size."""
        return v2.Compose([RescaleImage(self.hparams.scale)] + self._normalise())

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict":
            if hp.predict_root is None or hp.predict_output is None:
                raise UserError("predict needs data.init_args.predict_root (a folder of images) and "
                                 "data.init_args.predict_output (a folder for the masks)")
            if os.path.isfile(hp.predict_output):
                raise UserError(f"data.init_args.predict_output {hp.predict_output!r} is a file; give a folder")
            if os.path.isdir(hp.predict_output) and os.listdir(hp.predict_output) and not hp.predict_overwrite:
                raise OutputExistsError(f"data.init_args.predict_output {hp.predict_output!r} is not empty; pass "
                                        "--data.init_args.predict_overwrite true or choose another folder")
            check_output_file(os.path.join(hp.predict_output, "probe"), True, "data.init_args.predict_output", "")
            self.predict_set = PredictImages(scan_images(hp.predict_root), self.test_transform())
            return
        if self.val_set is not None:
            return
        check_data_root(hp.root, "the ADE20K folder holding images/ and annotations/", "/data/ADEChallengeData2016",
                        f"{hp.root}/images/{hp.train_split}/*.jpg and {hp.root}/annotations/{hp.train_split}/*.png")
        args = (hp.num_classes, hp.reduce_zero_label)
        if stage in (None, "fit"):
            self.train_set = SegmentationDataset(*scan_pairs(hp.root, hp.train_split), self.train_transform(), *args,
                                                 seed=self._seed())
        self.val_set = SegmentationDataset(*scan_pairs(hp.root, hp.val_split), self.test_transform(), *args)

    # ---- loaders (ShardedDataModule) ----
    def eval_batch_size(self) -> int:
        return 1  # one image per batch: sizes differ


