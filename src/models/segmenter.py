"""LightningModule for semantic segmentation: a features backbone + UperNet + auxiliary FCN head.

Loss, metrics, optimiser and inference live here, as in `ImageClassifier`:
- loss: cross-entropy on logits brought to the label's size (bilinear), pixels labelled `ignore_index`
  left out; plus `aux_weight` × the same loss of the auxiliary head;
- metrics: one confusion matrix over the whole validation set (torchmetrics, synced over ranks), from
  which mIoU (classes with an empty union left out of the mean, as mmsegmentation does), per-class IoU,
  pixel accuracy (aAcc) and mean class accuracy (mAcc);
- optimiser: AdamW without weight decay on norms, biases and the SSM's A_log and D, a linear warm-up by
  iterations, then polynomial decay to `min_lr` at the last iteration;
- inference ("whole image"): the image is padded to a multiple of 32, run once, the logits cropped and
  resized to the label's size; optional multi-scale (`test_scales`) and flip testing averages the softmax.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from src.backward import TrainingThreadBackward
from src.callbacks import FitSummary, ValidationImageGrid, adopt_data_classes
from src.checkpoints import check_architecture
from src.compiling import DEFAULT_MEMORY_BUDGET, CompileCacheWriter, compile_for_training, open_compile_cache
from src.errors import UserError
from src.models.upernet import FCNHead, UperNetHead, resize
from src.tb import log_hparams

STRIDE = 32


def color_palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: class c gets a fixed, well-spread colour (bits of c spread over R, G, B, the
    PASCAL VOC scheme; class 0 is black), entries past num_classes are black, the ignore label 255 white."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[255] = 255
    for c in range(min(num_classes, 255)):
        label, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette[c] = (r, g, b)
    return palette


def iou_from_confusion(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class IoU (NaN where a class has an empty union), mIoU over the classes with a union, aAcc, mAcc
    from a (K, K) confusion matrix with rows = ground truth, columns = prediction."""
    confmat = confmat.double()
    tp = confmat.diag()
    gt, pred = confmat.sum(1), confmat.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"iou": iou, "mIoU": iou.nanmean(), "aAcc": tp.sum() / confmat.sum().clamp(min=1), "mAcc": acc.nanmean()}


class SemanticSegmenter(TrainingThreadBackward, L.LightningModule):
    """UperNet segmentation model on a features backbone.

    Args:
        backbone: returns a list of 4 maps (B, C_i, H/4..H/32, W/4..W/32), finest first, and exposes the
            channels as `dims` and the selected stages as `out_indices` (SpatialMamba with features_only).
        num_classes: classes predicted (150 for ADE20K); labels are 0..num_classes-1 and `ignore_index`.
        decode_channels: width of the UperNet head (512 in the paper's recipe).
        pool_scales: pyramid pooling grid sizes.
        dropout: Dropout2d before each classifier.
        aux_channels: width of the auxiliary FCN head.
        aux_index: which of the backbone's maps the auxiliary head reads (2: stage 3, stride 16).
        aux_weight: weight of the auxiliary loss (0: no auxiliary head).
        ignore_index: label of pixels left out of loss and metrics.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay, not applied to norms, biases, A_log and D.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_iters: linear warm-up length in optimizer steps.
        warmup_ratio: the warm-up starts at lr × warmup_ratio (mmsegmentation's LinearLR start_factor).
        poly_power: power of the polynomial decay after the warm-up (1: linear).
        min_lr: learning rate at the last step (the poly schedule's floor).
        test_scales: scales of the validation/test image at which logits are computed and averaged
            (softmax); (1.0,) is whole-image single-scale testing, (0.75, 1.0, 1.25) the paper's multi-scale.
        test_flip: also average horizontally flipped inputs.
        grid_images: validation images drawn as input | ground truth | prediction in TensorBoard each
            validation epoch (0: none).
        compile: `torch.compile` the backbone (fixed training crops; validation sizes vary and recompile).
        compile_memory_budget: activation memory budget of the compiled training graph, in (0, 1] (see
            src/compiling.py; 1 = the partitioner's default, less = recompute more in the backward).
        compile_regional: one graph per stage shape instead of the whole backbone (as the classifier's; see
            src/compiling.py). Off by default.
        compile_parallel: with compile_regional, the stages' graphs compiled in parallel processes first (as the
            classifier's). Off by default.
        compile_ddp_split: under DDP, split the compiled graph at DDP's gradient buckets (as the classifier's;
            see src/compiling.py). Off by default.
        compile_cudagraphs: replay the compiled graphs as CUDA graphs (as the classifier's; see
            src/compiling.py). Off by default; every new validation size is recorded once; refused with
            trainer.accumulate_grad_batches > 1.
        compile_cache: a file for torch.compile's artifacts, loaded before the compile and written after the
            first step and validations (as the classifier's; see src/compiling.py). None: no file.
        backward_device_thread: the backward on PyTorch's autograd worker thread of the GPU (true) or the
            training thread (false); None (default): the worker when the backbone is compiled, else the training
            thread (as the classifier's; src/backward.py).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 150,
        decode_channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_channels: int = 256,
        aux_index: int = 2,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        poly_power: float = 1.0,
        min_lr: float = 0.0,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        grid_images: int = 4,
        compile: bool = False,
        compile_memory_budget: float = DEFAULT_MEMORY_BUDGET,
        compile_regional: bool = False,
        compile_parallel: bool = False,
        compile_ddp_split: bool = False,
        compile_cudagraphs: bool = False,
        compile_cache: str | None = None,
        backward_device_thread: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        dims, out_indices = getattr(backbone, "dims", None), getattr(backbone, "out_indices", None)
        if not getattr(backbone, "features_only", False) or dims is None or out_indices is None:
            raise UserError(
                "model.init_args.backbone must return stage maps: set the backbone's features_only: true "
                "(a SpatialMamba with features_only exposes dims and out_indices)"
            )
        in_channels = [dims[i] for i in out_indices]
        if len(in_channels) < 2:
            raise UserError(f"UperNet needs at least 2 stage maps, the backbone's out_indices are {list(out_indices)}")
        if num_classes < 1 or num_classes > 255 or (0 <= ignore_index < num_classes):
            raise UserError(f"model.init_args.num_classes must be in 1..255 and ignore_index ({ignore_index}) "
                            f"outside 0..num_classes-1, got num_classes={num_classes}")
        if not 0 <= aux_index < len(in_channels):
            raise UserError(f"model.init_args.aux_index must index the backbone's {len(in_channels)} maps, got {aux_index}")
        if not lr > 0 or min_lr < 0 or min_lr > lr:
            raise UserError(f"model.init_args.lr must be > 0 and min_lr in [0, lr], got lr={lr}, min_lr={min_lr}")
        if warmup_iters < 0 or not 0 < warmup_ratio <= 1:
            raise UserError(f"model.init_args.warmup_iters must be >= 0 and warmup_ratio in (0, 1], "
                            f"got {warmup_iters}, {warmup_ratio}")
        if not test_scales or any(s <= 0 for s in test_scales):
            raise UserError(f"model.init_args.test_scales must be positive scale factors, got {list(test_scales)}")
        if aux_weight < 0 or not 0 <= dropout < 1:
            raise UserError(f"model.init_args.aux_weight must be >= 0 and dropout in [0, 1), got {aux_weight}, {dropout}")
        self.backbone = backbone
        self.decode_head = UperNetHead(in_channels, num_classes, decode_channels, pool_scales, dropout)
        self.aux_head = FCNHead(in_channels[aux_index], num_classes, aux_channels, 1, dropout) if aux_weight > 0 else None
        self.criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.val_miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
        self.val_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.class_names = [str(c) for c in range(num_classes)]

    # ---- set-up ----
    def setup(self, stage: str) -> None:
        adopt_data_classes(self, "classes")
        if self.hparams.compile and not getattr(self, "_compiled", False):
            if self.hparams.compile_cache:
                self._compile_cache = open_compile_cache(self.hparams.compile_cache)
            compile_for_training(self.backbone, memory_budget=self.hparams.compile_memory_budget,
                                 regional=self.hparams.compile_regional, ddp_split=self.hparams.compile_ddp_split,
                                 cudagraphs=self.hparams.compile_cudagraphs, parallel=self.hparams.compile_parallel,
                                 accumulate_grad_batches=self.trainer.accumulate_grad_batches if self._trainer else 1,
                                 key="model.init_args.compile_memory_budget")
            self._compiled = True

    # ---- forward ----
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits at stride 4 of `images` (sides multiples of 32)."""
        return self.decode_head(self.backbone(images))

    def _logits_whole(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the size of `images` (any size): padded to a multiple of 32, run once, cropped."""
        H, W = images.shape[-2:]
        pad_h, pad_w = -H % STRIDE, -W % STRIDE
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        logits = resize(self(x), x.shape[-2:])
        return logits[..., :H, :W]

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Class scores (B, K, *out_size) of `images`: softmax averaged over `test_scales` and flips (or, for
        one scale without flip, the logits themselves), resized to `out_size` (the label's size)."""
        hp = self.hparams
        if tuple(hp.test_scales) == (1.0,) and not hp.test_flip:
            return resize(self._logits_whole(images), out_size)
        H, W = images.shape[-2:]
        total, n = 0.0, 0
        for s in hp.test_scales:
            x = images if s == 1.0 else resize(images, (max(1, round(H * s)), max(1, round(W * s))))
            for flip in (False, True) if hp.test_flip else (False,):
                logits = self._logits_whole(x.flip(-1) if flip else x)
                logits = logits.flip(-1) if flip else logits
                total = total + resize(logits, out_size).float().softmax(1)
                n += 1
        return total / n

    # ---- training ----
    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.criterion(resize(logits, masks.shape[-2:]).float(), masks)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        features = self.backbone(images)
        loss = decode_loss = self._loss(self.decode_head(features), masks)
        if self.aux_head is not None:
            aux_loss = self._loss(self.aux_head(features[self.hparams.aux_index]), masks)
            loss = loss + self.hparams.aux_weight * aux_loss
            self.log("train/aux_loss", aux_loss)
        self.log("train/decode_loss", decode_loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    # ---- evaluation ----
    def _evaluate(self, batch, prefix: str) -> dict:
        images, masks = batch[0], batch[1]
        preds = self.predict_probs(images, masks.shape[-2:]).argmax(1)  # (B, H, W) at the label's size
        self.val_miou(preds, masks)
        self.val_confmat(preds, masks)
        self.log(f"{prefix}/mIoU", self.val_miou, prog_bar=True)
        return {"preds": preds}

    def validation_step(self, batch, batch_idx: int) -> dict:
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict:
        return self._evaluate(batch, "test")

    def _log_confusion(self, prefix: str) -> None:
        scores = iou_from_confusion(self.val_confmat.compute())  # synced over ranks by torchmetrics
        self.val_confmat.reset()
        self.log(f"{prefix}/aAcc", scores["aAcc"].float(), sync_dist=False)
        self.log(f"{prefix}/mAcc", scores["mAcc"].float(), sync_dist=False)
        for name, iou in zip(self.class_names, scores["iou"].tolist()):
            if iou == iou:  # NaN: the class is in neither labels nor predictions
                self.log(f"{prefix}_iou/{name}", float(iou), sync_dist=False)
        self.last_scores = scores

    def on_validation_epoch_end(self) -> None:
        self._log_confusion("val")

    def on_test_epoch_end(self) -> None:
        self._log_confusion("test")

    def predict_step(self, batch, batch_idx: int) -> dict:
        images, sizes, paths = batch
        masks = []
        for image, size in zip(images, sizes.tolist()):  # each image back to its own original size
            masks.append(self.predict_probs(image[None], size).argmax(1)[0].to(torch.uint8).cpu())
        return {"masks": masks, "paths": list(paths)}

    # ---- checkpoints: the backbone's architecture is recorded and checked on load ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if callable(getattr(self.backbone, "architecture", None)):
            checkpoint["architecture"] = self.backbone.architecture()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if callable(getattr(self.backbone, "architecture", None)) and "architecture" in checkpoint:
            path = (self.trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
            check_architecture(checkpoint["architecture"], self.backbone.architecture(), path)

    # ---- fit start, optimiser, schedule ----
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.parameters())
        log_hparams(self.loggers, {"params": params}, ("val/mIoU", "val/aAcc"))
        rank_zero_info(f"{type(self.backbone).__name__} + UperNet: {params:,} parameters")

    def configure_optimizers(self):
        hp = self.hparams
        no_decay = {"backbone." + n for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
        decay, keep = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:  # norms and biases are 1-D; A_log is (D, N), named by the backbone
                (keep if name in no_decay or p.ndim <= 1 or name.endswith(("A_log", ".D")) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_iters, total)
        floor = hp.min_lr / hp.lr

        def factor(step: int) -> float:  # multiplier of lr at optimizer step `step`
            if step < warmup:
                return hp.warmup_ratio + (1 - hp.warmup_ratio) * step / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * (1 - progress) ** hp.poly_power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        callbacks = [SegmentationSummary(), ColorMaskWriter(), CompileCacheWriter()]
        if self.hparams.grid_images > 0:
            callbacks.append(SegmentationImageGrid(self.hparams.grid_images))
        return callbacks


class SegmentationSummary(FitSummary):
    """The fit's closing line: best and final validation mIoU, and the final aAcc."""

    def __init__(self):
        super().__init__("val/mIoU")

    def final(self, trainer, pl_module) -> str:
        scores = getattr(pl_module, "last_scores", {})
        acc = f", aAcc {self.score(scores['aAcc'])}" if "aAcc" in scores else ""
        return super().final(trainer, pl_module) + acc


class SegmentationImageGrid(ValidationImageGrid):
    """Each validation epoch: the first `num_images` validation images as rows of input | ground truth |
    prediction, written to TensorBoard as `val/grid` (rank 0, not during the sanity check)."""

    def add_rows(self, trainer, pl_module, outputs, batch) -> None:
        data = trainer.datamodule
        mean = torch.tensor(getattr(data, "mean", (0.0, 0.0, 0.0)), dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(getattr(data, "std", (1.0, 1.0, 1.0)), dtype=torch.float32).view(-1, 1, 1)
        scale = float(getattr(data, "pixel_scale", 255.0))  # images are normalised from [0, scale]
        palette = torch.from_numpy(color_palette(pl_module.hparams.num_classes)).float() / 255
        images, masks, preds = batch[0], batch[1], outputs["preds"]
        for image, mask, pred in zip(images, masks, preds):
            if len(self.rows) >= self.num_images:
                break
            image = resize(image[None].float().cpu(), mask.shape[-2:])[0]
            image = ((image * std + mean) / scale).clamp(0, 1)
            gt = palette[mask.cpu().long().clamp(0, 255)].permute(2, 0, 1)
            pr = palette[pred.cpu().long()].permute(2, 0, 1)
            self.rows.append(torch.cat([image[:3], gt, pr], dim=2))  # (3, H, 3W)


class ColorMaskWriter(BasePredictionWriter):
    """Writes each `predict` mask as a palette PNG (class c in colour c) to the datamodule's `predict_output`
    folder, under the input's path relative to `predict_root` with the extension .png."""

    def __init__(self):
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        from PIL import Image

        hp = getattr(trainer.datamodule, "hparams", {})
        root, output = hp.get("predict_root"), hp.get("predict_output")
        if not isinstance(prediction, dict) or "masks" not in prediction or not root or not output:
            return
        palette = color_palette(pl_module.hparams.num_classes)
        for mask, path in zip(prediction["masks"], prediction["paths"]):
            target = os.path.join(output, os.path.splitext(os.path.relpath(path, root))[0] + ".png")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            image = Image.fromarray(mask.numpy(), mode="P")
            image.putpalette(palette.flatten().tolist())
            image.save(target)
