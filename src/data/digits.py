"""The embedded default dataset: scikit-learn's bundled handwritten digits (1,797 real 8×8 scans).

No download: the images ship inside scikit-learn. They are upscaled to `image_size` (bilinear), split
once into a fixed stratified train/val split, and lightly augmented (small affine jitter) for training.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from src.checks import non_negative, require, stride_multiple
from src.data.imagefolder import check_output_file
from src.errors import UserError

DIGITS_CLASSES = [str(i) for i in range(10)]


def digit_scans(val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """scikit-learn's 1797 bundled digit scans as (N, 8, 8) floats in [0, 1], their digits, and the indices of a
    split stratified by digit (`val_fraction` for validation, fixed by `seed`): the canvases of the dense-task
    sets are built from the scans of one split only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    scans = torch.tensor(data.images, dtype=torch.float32) / 16.0
    digits = torch.tensor(data.target)
    train_idx, val_idx = train_test_split(range(len(digits)), test_size=val_fraction, stratify=data.target,
                                          random_state=seed)
    return scans, digits, list(train_idx), list(val_idx)


class _Augmented(Dataset):
    """Random affine jitter (rotation, shift, scale) of each image, drawn anew each time it is read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, degrees: float, translate: float, scale: float):
        self.images, self.labels = images, labels
        self.degrees, self.translate, self.scale = degrees, translate, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        angle = torch.empty(()).uniform_(-self.degrees, self.degrees).deg2rad()
        s = torch.empty(()).uniform_(1 - self.scale, 1 + self.scale)
        shift = torch.empty(2).uniform_(-self.translate, self.translate) * 2  # in [-1, 1] grid units
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack([torch.stack([cos, -sin, shift[0]]), torch.stack([sin, cos, shift[1]])])
        img = self.images[i][None]
        grid = F.affine_grid(theta[None], list(img.shape), align_corners=False)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return img[0], self.labels[i]


class _Named(Dataset):
    """(image, name) pairs for `predict`: the name goes to the prediction CSV's path column."""

    def __init__(self, images: torch.Tensor, names: list[str]):
        self.images, self.names = images, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        return self.images[i], self.names[i]


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits as a small image-classification task (10 classes).

    Args:
        batch_size: images per training step.
        image_size: side of the square images after bilinear upscaling from 8×8 (a multiple of 32).
        channels: image channels (the grey image repeated), 3 to match ImageNet-shaped backbones.
        val_fraction: share of each class held out for validation (fixed stratified split).
        split_seed: seed of that split; keep it fixed to compare runs.
        augment: small random rotation/shift/scale of training images.
        num_workers: DataLoader worker processes (0 is fastest for this in-memory set on a laptop).
        predict_output: CSV written by `predict` (the validation images, named `val/<index>`): path, class
            index, class name, probability. An existing file is refused unless `predict_overwrite` is true.
        predict_overwrite: replace an existing `predict_output`.
    """

    mean, std = 0.3, 0.4  # of the upscaled digits scaled to [0, 1]

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        predict_output: str = "predictions.csv",
        predict_overwrite: bool = False,
    ):
        super().__init__()
        stride_multiple("data.image_size", image_size)
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        require(batch_size >= 1, "data.init_args.batch_size", ">= 1", batch_size)
        require(channels >= 1, "data.init_args.channels", ">= 1", channels)
        non_negative("data.init_args.num_workers", num_workers)
        self.save_hyperparameters()
        self.num_classes = 10
        self.classes = DIGITS_CLASSES
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # before any work: an output that exists, is a folder or cannot be written
            check_output_file(self.hparams.predict_output, self.hparams.predict_overwrite,
                              "data.init_args.predict_output", "--data.init_args.predict_overwrite true")
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        hp = self.hparams
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        images = F.interpolate(images, size=(hp.image_size,) * 2, mode="bilinear", align_corners=False)
        images = ((images - self.mean) / self.std).repeat(1, hp.channels, 1, 1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = train_test_split(
            range(len(labels)), test_size=hp.val_fraction, stratify=digits.target, random_state=hp.split_seed
        )
        train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
        if hp.augment:
            self.train_set = _Augmented(images[train_idx], labels[train_idx], degrees=10, translate=0.08, scale=0.1)
        else:
            self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        images = self.val_set.tensors[0]
        return self._loader(_Named(images, [f"val/{i:04d}" for i in range(len(images))]), shuffle=False)
