"""The embedded detection default: an instance-segmentation set of real handwritten digits, written in COCO
format at run time from scikit-learn's bundled scans (no download), then read by the COCO data module.

Each canvas is `image_size`² of dark background with 1..`max_digits` scans (8×8, upscaled to a side drawn
from `digit_size`) pasted one after the other at random places; a later digit covers an earlier one where it
has ink. Every pasted digit is an instance of its class (10 categories, ids 1..10 = digits 0..9): its mask is
its ink (pixels above `ink_threshold`) that no later digit covers, its box the tight box of that mask, its
area the mask's pixel count, its segmentation the mask as compressed RLE. A placement that would hide more
than `max_occlusion` of an earlier digit's ink is drawn again (up to 20 times, then the digit is left out),
so every instance stays recognisable. The 1,797 scans are split once (stratified by digit, fixed seed) into
training and validation scans, so no scan appears in both splits.

The set is written to `root/<fingerprint>/` (`annotations/instances_{train,val}.json`, `train/*.png`,
`val/*.png`), where the fingerprint is a hash of the generation settings, so changing them makes a new folder
and an existing one is reused; the default root is the project's cache (`$SPATIAL_MAMBA_CACHE`, else
`~/.cache/spatial_mamba`) + `/digits_detection`. It is written once per machine (by local rank 0, in
`prepare_data`), into a temporary folder renamed into place, so concurrent runs never read a half-written set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from src.checks import require
from src.data.coco import COCODataModule
from src.data.digits import digit_scans

DIGIT_CATEGORIES = [{"id": d + 1, "name": str(d)} for d in range(10)]
GENERATOR_VERSION = 1  # bump when the drawing below changes, so old folders are not reused


def default_root() -> str:
    cache = os.environ.get("SPATIAL_MAMBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spatial_mamba")
    return os.path.join(cache, "digits_detection")


def compose_instances(scans: torch.Tensor, digits: torch.Tensor, count: int, image_size: int, max_digits: int,
                      digit_size: Sequence[int], ink_threshold: float, max_occlusion: float,
                      generator: torch.Generator) -> list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]]:
    """`count` canvases: (image (S, S) uint8, [(digit, visible mask (S, S) bool), ...] in pasting order)
    from `scans` (N, 8, 8) in [0, 1] with digit labels `digits` (N,)."""
    S = image_size
    canvases = []
    for _ in range(count):
        image = torch.zeros(S, S)
        owner = torch.full((S, S), -1, dtype=torch.long)  # which pasted digit each pixel's ink belongs to
        ink_total: list[int] = []
        labels: list[int] = []
        for _ in range(int(torch.randint(1, max_digits + 1, (), generator=generator))):
            k = int(torch.randint(len(scans), (), generator=generator))
            side = int(torch.randint(digit_size[0], digit_size[1] + 1, (), generator=generator))
            patch = F.interpolate(scans[k][None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            ink = patch > ink_threshold
            for _attempt in range(20):
                top, left = (int(torch.randint(0, S - side + 1, (), generator=generator)) for _ in range(2))
                covered = owner[top:top + side, left:left + side][ink]
                hidden = torch.bincount(covered[covered >= 0], minlength=len(labels)).tolist()
                visible = [(owner == j).sum().item() for j in range(len(labels))]
                if all(h <= max_occlusion * t and v - h > 0 for h, t, v in zip(hidden, ink_total, visible)):
                    break
            else:
                continue  # no place hides little enough of the others: leave this digit out
            region, owned = image[top:top + side, left:left + side], owner[top:top + side, left:left + side]
            # the new digit covers older ink where it has its own; elsewhere the brighter pixel shows
            region.copy_(torch.where(ink, patch, torch.maximum(region, patch)))
            owned[ink] = len(labels)
            labels.append(int(digits[k]))
            ink_total.append(int(ink.sum()))
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        canvases.append((pixels, [(d, (owner == j).numpy()) for j, d in enumerate(labels)]))
    return canvases


def coco_split(canvases: list, folder: str, split: str, first_id: int) -> dict:
    """Writes the canvases as `folder/<split>/NNNNNN.png` and returns their COCO annotation dict."""
    from pycocotools import mask as mask_utils

    os.makedirs(os.path.join(folder, split))
    images, annotations = [], []
    for i, (pixels, instances) in enumerate(canvases):
        name = f"{i:06d}.png"
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, split, name))
        images.append({"id": i + 1, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for digit, mask in instances:
            rows, cols = np.nonzero(mask)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": first_id + len(annotations), "image_id": i + 1, "category_id": digit + 1, "iscrowd": 0,
                "bbox": [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)],
                "area": int(mask.sum()), "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode()},
            })
    return {"images": images, "annotations": annotations, "categories": DIGIT_CATEGORIES}


class DigitsDetectionDataModule(COCODataModule):
    """Instances of handwritten digits on canvases, written in COCO format (module docstring), read through
    the COCO data module; 10 categories.

    Args:
        root: folder the set is written under (default: the project's cache, module docstring).
        image_size: canvas side in pixels.
        train_images: training canvases (from the training scans).
        val_images: validation canvases (from the validation scans).
        max_digits: digits per canvas, 1..max_digits.
        digit_size: (smallest, largest) side of a pasted scan in pixels (8×8 scans upscaled).
        ink_threshold: intensity above which a pasted scan's pixel is the digit (scans scaled to [0, 1]).
        max_occlusion: largest share of a digit's ink that later digits may cover.
        val_fraction: share of the scans held out for validation (stratified by digit).
        generator_seed: seed of the scan split and of the canvases; keep it fixed to compare runs.
        batch_size: training canvases per step.
        val_batch_size: validation canvases per step.
        num_workers: loader processes (0: in the main process, the fastest for this small set).
        scale: (long, short) size the canvases are resized to fit (the canvas size: no resize).
        hflip: probability of a horizontal flip (0: mirrored digits are other shapes).
        seed: seed of shuffling (default: the run's seed_everything).
        predict_root: folder of images for `predict` (default: the validation canvases).
        predict_output: JSON file the `predict` results are written to, in COCO's results format.
        predict_draw_dir: folder for copies of the predicted images with boxes and masks drawn (optional).
        predict_score_threshold: score above which a detection is drawn.
        predict_overwrite: allow replacing an existing predict_output file.
    """

    mean, std = (25.0, 25.0, 25.0), (60.0, 60.0, 60.0)  # of the 0..255 canvases (mostly dark background)

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 64,
        train_images: int = 3000,
        val_images: int = 300,
        max_digits: int = 3,
        digit_size: tuple[int, int] = (16, 32),
        ink_threshold: float = 0.3,
        max_occlusion: float = 0.4,
        val_fraction: float = 0.25,
        generator_seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int = 50,
        num_workers: int = 0,
        scale: tuple[int, int] | None = None,
        hflip: float = 0.0,
        seed: int | None = None,
        predict_root: str | None = None,
        predict_output: str | None = None,
        predict_draw_dir: str | None = None,
        predict_score_threshold: float = 0.3,
        predict_overwrite: bool = False,
    ):
        require(image_size >= 32, "data.image_size", ">= 32", image_size)
        require(len(digit_size) == 2 and 4 <= digit_size[0] <= digit_size[1] <= image_size, "data.digit_size",
                f"(smallest, largest) with 4 <= smallest <= largest <= image_size={image_size}", list(digit_size))
        require(train_images >= 1 and val_images >= 1 and max_digits >= 1, "data.train_images, val_images and "
                "max_digits", ">= 1", [train_images, val_images, max_digits])
        require(0 < ink_threshold < 1 and 0 <= max_occlusion < 1 and 0 < val_fraction < 1, "data.ink_threshold, "
                "max_occlusion and val_fraction", "in (0, 1), [0, 1) and (0, 1)", [ink_threshold, max_occlusion, val_fraction])
        scale = tuple(scale) if scale is not None else (image_size, image_size)
        super().__init__(root=root, train_split="train", val_split="val", batch_size=batch_size,
                         val_batch_size=val_batch_size, num_workers=num_workers, scale=scale, hflip=hflip,
                         filter_empty=True, min_image_size=0, mean=self.mean, std=self.std, seed=seed,
                         pin_memory=False, persistent_workers=num_workers > 0, predict_root=predict_root,
                         predict_output=predict_output, predict_draw_dir=predict_draw_dir,
                         predict_score_threshold=predict_score_threshold, predict_overwrite=predict_overwrite)
        settings = {k: self.hparams[k] for k in ("image_size", "train_images", "val_images", "max_digits", "digit_size",
                                                   "ink_threshold", "max_occlusion", "val_fraction", "generator_seed")}
        settings = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
        settings["version"] = GENERATOR_VERSION
        self.settings = settings
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = os.path.join(root or default_root(), fingerprint)

    @property
    def data_root(self) -> str:
        return self.folder

    def prepare_data(self) -> None:
        """Writes the set unless this machine already has it."""
        if os.path.isfile(os.path.join(self.folder, "settings.json")):
            return
        hp = self.hparams
        scans, digits, train_idx, val_idx = digit_scans(hp.val_fraction, hp.generator_seed)
        generator = torch.Generator().manual_seed(hp.generator_seed)
        parent = os.path.dirname(os.path.abspath(self.folder))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(self.folder)}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "annotations"))
        first_id = 1
        for split, idx, count in (("train", train_idx, hp.train_images), ("val", val_idx, hp.val_images)):
            idx = torch.tensor(idx)
            canvases = compose_instances(scans[idx], digits[idx], count, hp.image_size, hp.max_digits, hp.digit_size,
                                         hp.ink_threshold, hp.max_occlusion, generator)
            coco = coco_split(canvases, tmp, split, first_id)
            first_id += len(coco["annotations"])
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump({**self.settings, "train_scans": list(train_idx), "val_scans": list(val_idx)}, f)
        try:
            os.rename(tmp, self.folder)
        except OSError:  # another process finished the same set first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isfile(os.path.join(self.folder, "settings.json")):
                raise

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or self.hparams.get("predict_root") is None:
            self.prepare_data()  # a no-op when prepare_data already ran (Lightning runs it before setup)
        super().setup(stage)
