"""COCO-format instance sets (COCO itself, or any set in its format) for Mask R-CNN, in the usual layout:

    root/annotations/instances_train2017.json      root/train2017/000000000009.jpg ...
    root/annotations/instances_val2017.json        root/val2017/000000000139.jpg ...

The annotation file holds `images` (id, file_name, height, width), `categories` (id, name) and `annotations`
(id, image_id, category_id, bbox [x, y, w, h], area, iscrowd, segmentation as polygons or RLE, compressed
or not). Category ids are mapped to labels 1..K in increasing id order (0 is torchvision's background); the
mapping is saved in checkpoints so `predict` writes the original ids.

How annotations are used (mmdetection's CocoDataset rules, so results are comparable with its numbers):
- training: crowd annotations (iscrowd 1) are left out; annotations with a box side under 1 pixel or an area
  of 0, or a polygon mask with no polygon of 3 or more points, are skipped (counted in one log line); images
  with no annotation of a known category, or a side under `min_image_size`, are not trained on
  (`filter_empty`); images whose annotations were all crowd or skipped stay, as negatives;
- evaluation: every image, every annotation; crowd regions are what COCO evaluation ignores detections in,
  `area` is the annotation's (it decides small / medium / large, as in pycocotools).
Bad data stops with one line naming the file and the entry: a missing annotation file or image folder, JSON
that is not COCO's format, an annotation whose image_id is not among the images or whose category_id is not
among the categories, a box that is not 4 numbers or has a negative side, an annotation without a
segmentation, an RLE mask or image file whose size differs from its `images` entry, images listed but absent
from the folder.

Pipelines (images and their boxes and masks transformed together by torchvision transforms v2):
- 1×: resize to fit `scale` = (1333, 800) keeping the aspect ratio, horizontal flip (0.5);
- 3× multi-scale: the short side drawn from `train_short_sides` (480..800 step 32), the long side at most
  1333; with `crop_branch`, half of the images instead take the detection-transformer branch: short side from
  `crop_pre_short_sides` (400, 500, 600), a random crop of `crop_size` (384..600 per side), then the
  multi-scale resize (boxes clipped to the crop, emptied ones dropped with their masks);
- test: resize to fit `scale`; predictions are mapped back to the original image, where they are scored.
Batches hold images of different sizes, padded bottom/right with zeros (after normalisation) to a common
size that is a multiple of 32. Exact resume and unpadded distributed evaluation come from the ImageNet
module's samplers.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from src.checks import increasing_pair, probability, require
from src.data.ade20k import ADE_MEAN, ADE_STD, _PairTransform, rescale_size
from src.data.imagefolder import (
    _SeededRNG,
    check_output_file,
    scan_images,
    to_rgb,
)
from src.data.sharded import ShardedDataModule
from src.errors import DataError, InputNotFoundError, UserError

log = logging.getLogger(__name__)

STRIDE = 32  # batches are padded to a multiple of the backbone's total stride


# ---- annotation files ----------------------------------------------------------------------------------------

def _polygons(segmentation: list) -> list[list[float]]:
    """The polygons of an annotation that have at least 3 points (mmdetection drops shorter ones; pycocotools
    would read a 4-number polygon as a box)."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def _check_rle(segmentation: dict, where: str, height: int, width: int) -> None:
    size = segmentation.get("size")
    if "counts" not in segmentation or not isinstance(size, list) or len(size) != 2:
        raise UserError(f"{where} has an RLE segmentation without 'size' [height, width] and 'counts'")
    if list(size) != [height, width]:
        raise UserError(f"{where} has an RLE mask of size {size[1]}×{size[0]} (width×height) but its image is "
                         f"{width}×{height}")


class CocoAnnotations:
    """One COCO-format annotation file, checked and indexed by image.

    Args:
        path: the JSON file.
        image_dir: folder the images' `file_name`s are relative to (checked to hold them all).
        train: training rules (crowd and degenerate annotations left out, images filtered) or evaluation
            rules (everything kept); module docstring.
        filter_empty: (training) leave out images with no annotation of a known category.
        min_image_size: (training) leave out images whose shorter side is smaller.

    Per image it keeps the boxes (x1, y1, x2, y2), labels 1..K, crowd flags, areas and segmentations,
    pickled into one byte buffer (with offsets) so that forked loader workers share it instead of copying
    millions of small Python objects through reference counting.
    """

    def __init__(self, path: str, image_dir: str, train: bool, filter_empty: bool = True, min_image_size: int = 32):
        if not os.path.isfile(path):
            raise InputNotFoundError(f"COCO annotation file not found: {path!r}")
        if not os.path.isdir(image_dir):
            raise InputNotFoundError(f"COCO image folder not found: {image_dir!r} (the images of {path!r})")
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"COCO annotation file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise UserError(f"COCO annotation file {path!r} needs the lists 'images', 'annotations' and 'categories'")
        self.path, self.image_dir = path, image_dir
        try:
            categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
            images = [(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"])) for im in data["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"COCO annotation file {path!r}: every category needs 'id' and 'name', every image 'id', "
                             f"'file_name', 'height' and 'width' ({type(e).__name__}: {e})") from None
        if not categories:
            raise UserError(f"COCO annotation file {path!r} has no categories")
        self.category_ids = [c for c, _ in categories]
        self.category_names = [n for _, n in categories]
        label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        if len(label_of) != len(categories):
            raise UserError(f"COCO annotation file {path!r} lists a category id twice")
        position = {}
        for i, (image_id, *_rest) in enumerate(images):
            if image_id in position:
                raise UserError(f"COCO annotation file {path!r} lists image id {image_id} twice")
            position[image_id] = i
        self._check_files([name for _, name, _, _ in images])

        per_image: list[list] = [[] for _ in images]
        skipped = 0
        for ann in data["annotations"]:
            where = f"{path}: annotation {ann.get('id', '?')}"
            image_id, category_id = ann.get("image_id"), ann.get("category_id")
            if image_id not in position:
                raise UserError(f"{where} points at image_id {image_id!r}, which is not among the file's images")
            if category_id not in label_of:
                raise UserError(f"{where} has category_id {category_id!r}, which is not among the categories "
                                 f"{self.category_ids[:10]}{' ...' if len(self.category_ids) > 10 else ''}")
            box = ann.get("bbox")
            if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
                raise UserError(f"{where} has bbox {box!r}; expected [x, y, width, height]")
            x, y, w, h = (float(v) for v in box)
            if w < 0 or h < 0:
                raise UserError(f"{where} has bbox {box!r} with a negative width or height")
            _, _, height, width = images[position[image_id]]
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, dict):
                _check_rle(segmentation, where, height, width)
            elif not isinstance(segmentation, list):
                raise UserError(f"{where} has no segmentation; Mask R-CNN needs polygons or an RLE mask")
            crowd = int(bool(ann.get("iscrowd", 0)))
            area = float(ann.get("area", w * h))
            if train:
                if crowd:
                    continue  # mmdetection: crowd instances are ignored in training
                if w < 1 or h < 1 or area <= 0 or (isinstance(segmentation, list) and not _polygons(segmentation)):
                    skipped += 1
                    continue
            per_image[position[image_id]].append((x, y, x + w, y + h, label_of[category_id], crowd, area, segmentation))
        if skipped:
            log.warning("%s: skipped %d training annotations with a box side under 1 pixel, zero area or no polygon "
                        "of 3 or more points", path, skipped)

        keep = range(len(images))
        if train:
            # as mmdetection's filter_empty_gt: an image counts as annotated if any annotation (crowd too) names it
            annotated = {position[a["image_id"]] for a in data["annotations"]}
            keep = [i for i in keep if (not filter_empty or i in annotated) and min(images[i][2:]) >= min_image_size]
        self.image_ids = np.array([images[i][0] for i in keep], dtype=np.int64)
        self.sizes = np.array([images[i][2:] for i in keep], dtype=np.int64).reshape(-1, 2)  # (height, width)
        names = [images[i][1].encode() for i in keep]
        self.file_names = np.array(names) if names else np.array([], dtype="S1")
        blobs = [pickle.dumps(per_image[i], protocol=pickle.HIGHEST_PROTOCOL) for i in keep]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.num_annotations = sum(len(per_image[i]) for i in keep)

    def _check_files(self, names: list[str]) -> None:
        present = set(os.listdir(self.image_dir))
        missing = [n for n in names if n not in present and not os.path.isfile(os.path.join(self.image_dir, n))]
        if missing:
            raise InputNotFoundError(f"{len(missing)} image(s) of {self.path!r} are missing from {self.image_dir!r}, "
                                    f"e.g. {missing[0]!r}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, index: int) -> list[tuple]:
        """(x1, y1, x2, y2, label, iscrowd, area, segmentation) of every annotation of image `index`."""
        return pickle.loads(self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes())

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.file_names[index].decode())


def decode_masks(segmentations: list, height: int, width: int) -> torch.Tensor:
    """(N, height, width) uint8 masks of COCO segmentations: polygon lists, or RLE dicts with compressed
    (string) or uncompressed (list) counts."""
    from pycocotools import mask as mask_utils

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):
            polygons = _polygons(seg)
            if not polygons:
                continue  # no usable polygon: an empty mask (evaluation keeps such annotations)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
        masks[i] = mask_utils.decode(rle)
    return torch.from_numpy(masks)


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8 RGB; an unreadable file, or one whose size differs from its annotation, is one line."""
    try:
        with Image.open(path) as img:
            image = np.asarray(to_rgb(img))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image {path!r}: {e}") from None
    if image.shape[:2] != (height, width):
        raise UserError(f"image {path!r} is {image.shape[1]}×{image.shape[0]} but its annotation file says "
                         f"{width}×{height}")
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


# ---- transforms ----------------------------------------------------------------------------------------------

class RandomCropRange(_PairTransform):
    """Random crop whose height and width are each drawn uniformly from `size` = (min, max) (capped at the
    image's side), at a random position; boxes are clipped to it (mmdetection's `absolute_range` crop)."""

    def __init__(self, size: Sequence[int] = (384, 600)):
        super().__init__()
        self.size = tuple(size)

    def make_params(self, flat_inputs) -> dict:
        H, W = v2.query_size(flat_inputs)
        h = int(torch.randint(min(self.size[0], H), min(self.size[1], H) + 1, ()))
        w = int(torch.randint(min(self.size[0], W), min(self.size[1], W) + 1, ()))
        top, left = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt, params):
        return TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])


class RandomFitResize(_PairTransform):
    """Resize keeping the aspect ratio so that the image fits (long, short) = `max_long` × a short side drawn
    uniformly from `short_sides` (one side: a fixed size): the short side becomes `short` unless the long side
    would then exceed `max_long` (mmdetection's keep-ratio resize, sides rounded to the nearest pixel)."""

    def __init__(self, max_long: int, short_sides: Sequence[int]):
        super().__init__()
        self.max_long, self.short_sides = int(max_long), [int(s) for s in short_sides]

    def make_params(self, flat_inputs) -> dict:
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()))] if len(self.short_sides) > 1 else self.short_sides[0]
        h, w = v2.query_size(flat_inputs)
        return {"size": list(rescale_size(h, w, (max(self.max_long, short), short)))}

    def transform(self, inpt, params):
        return TF.resize(inpt, params["size"], antialias=True)  # masks: nearest (tv_tensors.Mask)


def train_transform(scale: Sequence[int], short_sides: Sequence[int] | None, crop_branch: bool,
                    crop_pre_short_sides: Sequence[int], crop_size: Sequence[int], hflip: float,
                    mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The training pipeline (module docstring): geometry, flip, normalisation of the 0..255 image."""
    long_side = max(scale)
    resize = RandomFitResize(long_side, short_sides or [min(scale)])
    if crop_branch:
        crop = v2.Compose([RandomFitResize(long_side, crop_pre_short_sides), RandomCropRange(crop_size), resize,
                           v2.SanitizeBoundingBoxes(min_size=1)])
        resize = v2.RandomChoice([resize, crop])
    return v2.Compose([resize, v2.RandomHorizontalFlip(hflip), v2.ToDtype(torch.float32, scale=False),
                       v2.Normalize(list(mean), list(std))])


def test_transform(scale: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([RandomFitResize(max(scale), [min(scale)]), v2.ToDtype(torch.float32, scale=False), v2.Normalize(list(mean), list(std))])


# ---- datasets ------------------------------------------------------------------------------------------------

class CocoInstances(Dataset):
    """Images of a `CocoAnnotations` through a transform.

    Training items: (image (3, h, w) normalised, {"boxes" (N, 4) xyxy, "labels" (N,), "masks" (N, h, w) uint8}
    at the transformed size, meta). Evaluation items (`train=False`): the transformed image, the annotations at
    the original size ({..., "iscrowd", "area"}; the masks are what the metric scores) and meta. meta =
    {"image_id", "original_size" (H, W), "index"}. `dataset[(index, epoch)]` seeds the transform by
    (seed, epoch, index), as the ResumableSampler asks, for exact resume.
    """

    def __init__(self, annotations: CocoAnnotations, transform, train: bool, seed: int = 0):
        self.annotations, self.transform, self.train, self.seed = annotations, transform, train, seed

    def __len__(self) -> int:
        return len(self.annotations)

    def target(self, index: int) -> dict:
        H, W = (int(s) for s in self.annotations.sizes[index])
        anns = self.annotations.annotations(index)
        boxes = torch.tensor([a[:4] for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {"boxes": boxes, "labels": torch.tensor([a[4] for a in anns], dtype=torch.int64),
                "masks": decode_masks([a[7] for a in anns], H, W),
                "iscrowd": torch.tensor([a[5] for a in anns], dtype=torch.int64),
                "area": torch.tensor([a[6] for a in anns], dtype=torch.float32)}

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        H, W = (int(s) for s in self.annotations.sizes[index])
        image = load_image(self.annotations.image_path(index), H, W)
        target = self.target(index)
        meta = {"image_id": int(self.annotations.image_ids[index]), "original_size": (H, W), "index": index}
        if not self.train:
            return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), target, meta
        sample = (tv_tensors.Image(image),
                  {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(H, W)),
                   "masks": tv_tensors.Mask(target["masks"]), "labels": target["labels"]})
        if epoch is None:
            image, out = self.transform(*sample)
        else:
            with _SeededRNG(self.seed, epoch, index):
                image, out = self.transform(*sample)
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in out.items()}, meta


class PredictImages(Dataset):
    """Images of a folder (any depth) for `predict`: (image at test scale, None, meta); the image id is the
    position in the sorted list, `file_name` the path relative to the folder."""

    def __init__(self, root: str, transform):
        self.root, self.paths, self.transform = root, scan_images(root), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                image = torch.from_numpy(np.asarray(to_rgb(img)).copy()).permute(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"unreadable image {path!r}: {e}") from None
        meta = {"image_id": index, "original_size": tuple(image.shape[-2:]), "index": index,
                "file_name": os.path.relpath(path, self.root)}
        return self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), None, meta


def collate_detection(items: list) -> dict:
    """A batch of (image, target, meta): images padded bottom/right with zeros to a common size, a multiple
    of 32 -> {"images" (B, 3, H, W), "image_sizes" (B, 2) before padding, "targets" [dict] (None entries
    for unannotated predict images), "image_ids" (B,), "original_sizes" (B, 2), "meta" [dict]}."""
    images = [item[0] for item in items]
    H = -(-max(im.shape[-2] for im in images) // STRIDE) * STRIDE
    W = -(-max(im.shape[-1] for im in images) // STRIDE) * STRIDE
    batch = images[0].new_zeros(len(images), images[0].shape[0], H, W)
    for b, im in zip(batch, images):
        b[:, :im.shape[-2], :im.shape[-1]].copy_(im)
    metas = [item[2] for item in items]
    return {"images": batch, "image_sizes": torch.tensor([im.shape[-2:] for im in images]),
            "targets": [item[1] for item in items], "image_ids": torch.tensor([m["image_id"] for m in metas]),
            "original_sizes": torch.tensor([m["original_size"] for m in metas]), "meta": metas}


# ---- data module ---------------------------------------------------------------------------------------------

class COCODataModule(ShardedDataModule):
    """A COCO-format instance set for Mask R-CNN (module docstring).

    Args:
        root: folder holding `annotations/instances_<split>.json` and one image folder per split.
        train_split: training split name (its image folder and `instances_<name>.json`).
        val_split: validation split name (also used by `test`, and by `predict` without predict_root).
        batch_size: training images per device (the paper: 2 × 8 GPUs).
        val_batch_size: validation images per device.
        num_workers: loader processes per device.
        scale: (long, short) size the images are resized to fit, keeping the aspect ratio (training, 1×
            pipeline, and testing).
        train_short_sides: multi-scale training: the short side drawn from these (the long side at most
            max(scale)); None: resize to `scale`.
        crop_branch: half of the training images take the resize + random crop branch (module docstring).
        crop_pre_short_sides: short sides of the resize before that crop.
        crop_size: (min, max) side of the random crop.
        hflip: probability of a horizontal flip in training.
        filter_empty: leave images without annotations out of training (mmdetection's filter_empty_gt).
        min_image_size: leave training images whose shorter side is smaller out.
        mean: per-channel mean subtracted (0..255 scale).
        std: per-channel std divided by (0..255 scale).
        seed: seed of shuffling and augmentation (default: the run's seed_everything).
        pin_memory: page-locked batches for faster GPU copies.
        persistent_workers: keep loader processes between epochs.
        predict_root: folder of images for `predict` (default: the validation split, with its image ids).
        predict_output: JSON file the `predict` results are written to, in COCO's results format.
        predict_draw_dir: folder for copies of the predicted images with boxes and masks drawn (optional).
        predict_score_threshold: score above which a detection is drawn.
        predict_overwrite: allow replacing an existing predict_output file.
    """

    pixel_scale = 255.0

    def __init__(
        self,
        root: str | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        batch_size: int = 2,
        val_batch_size: int = 2,
        num_workers: int = 4,
        scale: tuple[int, int] = (1333, 800),
        train_short_sides: Sequence[int] | None = None,
        crop_branch: bool = False,
        crop_pre_short_sides: Sequence[int] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        hflip: float = 0.5,
        filter_empty: bool = True,
        min_image_size: int = 32,
        mean: tuple[float, float, float] = ADE_MEAN,
        std: tuple[float, float, float] = ADE_STD,
        seed: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_root: str | None = None,
        predict_output: str | None = None,
        predict_draw_dir: str | None = None,
        predict_score_threshold: float = 0.3,
        predict_overwrite: bool = False,
    ):
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        require(batch_size >= 1 and val_batch_size >= 1, "data.batch_size and val_batch_size", ">= 1",
                [batch_size, val_batch_size])
        require(len(scale) == 2 and min(scale) >= 1, "data.scale", "(long, short) sides >= 1", list(scale))
        require(not train_short_sides or all(s >= 1 for s in train_short_sides), "data.train_short_sides",
                "null or a list of sides >= 1", train_short_sides)
        require(all(s >= 1 for s in crop_pre_short_sides) and len(crop_pre_short_sides) > 0,
                "data.crop_pre_short_sides", "a list of sides >= 1", crop_pre_short_sides)
        increasing_pair("data.crop_size", crop_size)
        probability("data.hflip", hflip)
        probability("data.predict_score_threshold", predict_score_threshold)
        require(min_image_size >= 0 and num_workers >= 0, "data.min_image_size and num_workers", ">= 0",
                [min_image_size, num_workers])
        self.save_hyperparameters()
        self.hparams.update(settings)  # a subclass built by the CLI records only its own knobs; these are read below
        self.mean, self.std = tuple(mean), tuple(std)
        self.category_ids: list[int] = []
        self.classes: list[str] = []
        self.train_set = self.val_set = self.predict_set = None

    @property
    def num_classes(self) -> int | None:
        """Categories of the annotation files (None before set-up and without a checkpoint)."""
        return len(self.category_ids) or None

    def train_transform(self) -> v2.Compose:
        hp = self.hparams
        return train_transform(hp.scale, hp.train_short_sides, hp.crop_branch, hp.crop_pre_short_sides, hp.crop_size,
                               hp.hflip, self.mean, self.std)

    def test_transform(self) -> v2.Compose:
        return test_transform(self.hparams.scale, self.mean, self.std)

    @property
    def data_root(self) -> str | None:
        """The folder holding annotations/ and the image folders."""
        return self.hparams.root

    def _split(self, split: str, train: bool) -> CocoAnnotations:
        hp, root = self.hparams, self.data_root
        return CocoAnnotations(os.path.join(root, "annotations", f"instances_{split}.json"),
                               os.path.join(root, split), train, hp.filter_empty, hp.min_image_size)

    def _set_categories(self, annotations: CocoAnnotations) -> None:
        if self.category_ids and (annotations.category_ids != self.category_ids or annotations.category_names != self.classes):
            raise UserError(f"{annotations.path!r} has categories {annotations.category_ids[:5]}... "
                             f"({len(annotations.category_ids)}) but the other split (or the checkpoint) has "
                             f"{self.category_ids[:5]}... ({len(self.category_ids)}); they must be the same")
        self.category_ids, self.classes = list(annotations.category_ids), list(annotations.category_names)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict":
            if not hp.predict_output:
                raise UserError("predict needs data.init_args.predict_output (a JSON file for the COCO-format results)")
            check_output_file(hp.predict_output, hp.predict_overwrite, "data.init_args.predict_output",
                              "--data.init_args.predict_overwrite true")
            if hp.predict_draw_dir and os.path.isfile(hp.predict_draw_dir):
                raise UserError(f"data.init_args.predict_draw_dir {hp.predict_draw_dir!r} is a file; give a folder")
            if hp.predict_root is not None:
                self.predict_set = PredictImages(hp.predict_root, self.test_transform())
                return
        root = self.data_root
        if root is None:
            raise UserError("data.init_args.root is not set: give the COCO folder holding annotations/ and the image "
                             "folders (--data.init_args.root /data/coco)")
        if not os.path.isdir(root):
            raise InputNotFoundError(f"data.root not found: {root!r} (expected {root}/annotations/"
                                    f"instances_{hp.train_split}.json and {root}/{hp.train_split}/)")
        if stage in (None, "fit") and self.train_set is None:
            annotations = self._split(hp.train_split, train=True)
            self._set_categories(annotations)
            self.train_set = CocoInstances(annotations, self.train_transform(), train=True, seed=self._seed())
            log.info("%s: %d training images, %d instances", annotations.path, len(annotations), annotations.num_annotations)
        if self.val_set is None:
            annotations = self._split(hp.val_split, train=False)
            self._set_categories(annotations)
            self.val_set = CocoInstances(annotations, self.test_transform(), train=False)
        if stage == "predict":
            self.predict_set = self.val_set

    # ---- loaders (ShardedDataModule: batches of images of different sizes, padded by collate_detection) ----
    collate_fn = staticmethod(collate_detection)

    # ---- checkpoint: the category ids and names, so predict maps labels back without the annotation files ----
    def state_dict(self) -> dict:
        return {"category_ids": list(self.category_ids), "classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        ids, names = list(state.get("category_ids", [])), list(state.get("classes", []))
        if self.category_ids and ids and (ids, names) != (self.category_ids, self.classes):
            raise UserError(f"the checkpoint was trained on {len(ids)} categories {ids[:5]}..., the data has "
                             f"{len(self.category_ids)} {self.category_ids[:5]}...; they must be the same")
        if ids:
            self.category_ids, self.classes = ids, names
