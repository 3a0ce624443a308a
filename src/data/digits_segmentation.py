"""The embedded segmentation default: canvases of real handwritten digits from scikit-learn's bundled scans.

Each canvas is `image_size`² of dark background with 1..`max_digits` scans pasted at random positions and
sizes; a later digit covers an earlier one where it has ink (occlusion). The label of a pixel is the digit
+ 1 where the pasted scan's ink is above `ink_threshold`, else 0 (background): 11 classes. The 1,797 scans
are split once (stratified by digit, fixed seed) into training and validation scans, so no scan appears in
both sets; the canvases themselves are drawn from a fixed seed at set-up, no download.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from src.data.digits import digit_scans
from src.checks import stride_multiple
from src.errors import UserError

DIGITS_SEGMENTATION_CLASSES = ["background"] + [f"digit_{d}" for d in range(10)]


def compose_canvases(scans: torch.Tensor, digits: torch.Tensor, count: int, image_size: int, max_digits: int,
                     digit_size: tuple[int, int], ink_threshold: float, generator: torch.Generator):
    """`count` canvases (count, 1, S, S) in [0, 1] and their label maps (count, S, S) from `scans`
    (N, 8, 8) in [0, 1] with digit labels `digits` (N,)."""
    S = image_size
    images = torch.zeros(count, 1, S, S)
    labels = torch.zeros(count, S, S, dtype=torch.long)
    for i in range(count):
        n = int(torch.randint(1, max_digits + 1, (), generator=generator))
        for _ in range(n):
            k = int(torch.randint(len(scans), (), generator=generator))
            side = int(torch.randint(digit_size[0], digit_size[1] + 1, (), generator=generator))
            top, left = (int(torch.randint(0, S - side + 1, (), generator=generator)) for _ in range(2))
            patch = F.interpolate(scans[k][None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            ink = patch > ink_threshold
            region = images[i, 0, top:top + side, left:left + side]
            # the new digit covers older ink where it has its own; elsewhere the brighter pixel shows
            region.copy_(torch.where(ink, patch, torch.maximum(region, patch)))
            labels[i, top:top + side, left:left + side][ink] = int(digits[k]) + 1
    return images, labels


class DigitsSegmentationDataModule(L.LightningDataModule):
    """Segmentation of digits pasted on canvases (module docstring); 11 classes, background = 0.

    Args:
        batch_size: canvases per training step.
        val_batch_size: canvases per validation step.
        image_size: canvas side (a multiple of 32).
        channels: image channels (the grey canvas repeated).
        train_images: training canvases (drawn once from the training scans).
        val_images: validation canvases (drawn once from the validation scans).
        max_digits: digits per canvas, 1..max_digits.
        digit_size: (smallest, largest) side of a pasted scan in pixels (8×8 scans upscaled).
        ink_threshold: intensity above which a pasted scan's pixel is the digit (scans scaled to [0, 1]).
        val_fraction: share of the scans held out for validation (stratified by digit).
        seed: seed of the scan split and of the canvases; keep it fixed to compare runs.
        num_workers: DataLoader worker processes (0 is fastest for this in-memory set).
    """

    mean, std, pixel_scale = (0.1, 0.1, 0.1), (0.3, 0.3, 0.3), 1.0

    def __init__(
        self,
        batch_size: int = 8,
        val_batch_size: int = 50,
        image_size: int = 64,
        channels: int = 3,
        train_images: int = 4000,
        val_images: int = 200,
        max_digits: int = 2,
        digit_size: tuple[int, int] = (24, 36),
        ink_threshold: float = 0.3,
        val_fraction: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        stride_multiple("data.image_size", image_size)
        if not 4 <= digit_size[0] <= digit_size[1] <= image_size:
            raise UserError(f"data.digit_size must be (smallest, largest) with 4 <= smallest <= largest <= "
                            f"image_size={image_size}, got {list(digit_size)}")
        if not 0 < val_fraction < 1 or max_digits < 1 or not 0 < ink_threshold < 1:
            raise UserError(f"data.val_fraction and ink_threshold must be in (0, 1) and max_digits >= 1, "
                            f"got {val_fraction}, {ink_threshold}, {max_digits}")
        self.save_hyperparameters()
        self.num_classes = len(DIGITS_SEGMENTATION_CLASSES)
        self.classes = DIGITS_SEGMENTATION_CLASSES
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        hp = self.hparams
        scans, digits, train_idx, val_idx = digit_scans(hp.val_fraction, hp.seed)
        self.train_scans, self.val_scans = train_idx, val_idx  # indices into load_digits()
        generator = torch.Generator().manual_seed(hp.seed)
        sets = []
        for idx, count in ((train_idx, hp.train_images), (val_idx, hp.val_images)):
            idx = torch.tensor(idx)
            images, labels = compose_canvases(scans[idx], digits[idx], count, hp.image_size, hp.max_digits,
                                              tuple(hp.digit_size), hp.ink_threshold, generator)
            images = ((images - self.mean[0]) / self.std[0]).repeat(1, hp.channels, 1, 1)
            sets.append(TensorDataset(images, labels))
        self.train_set, self.val_set = sets

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.val_batch_size, shuffle=False)
