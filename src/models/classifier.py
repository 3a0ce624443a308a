"""LightningModule for image classification with any backbone (Spatial-Mamba by default)."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier: AdamW, per-step linear warm-up then cosine decay, top-1/top-5 metrics.

    Args:
        backbone: the network mapping images (B, 3, H, W) to logits (B, num_classes).
        num_classes: number of classes (must match the backbone's head).
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay, not applied to the backbone's `no_weight_decay()` parameters
            (norms, biases, A_log, D, fusion mixing weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_epochs: linear warm-up length in epochs (may be fractional); stepped per iteration.
        warmup_lr: learning rate at the first step.
        min_lr: learning rate reached at the end of the cosine decay.
        label_smoothing: label smoothing of the cross-entropy.
        compile: `torch.compile` the backbone (in place, checkpoint keys unchanged); None = on when
            training on a CUDA GPU, off elsewhere.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 1000,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_epochs: float = 1.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.1,
        compile: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        head = getattr(backbone, "num_classes", num_classes)
        if head != num_classes:
            raise ValueError(
                f"model.init_args.num_classes={num_classes} but the backbone's head has {head} classes; "
                "set both to the number of classes of the data"
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))

    def setup(self, stage: str) -> None:
        use = self.hparams.compile
        if use is None:
            use = self.device.type == "cuda" or (self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        if use and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self._compiled = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.train_acc(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def _evaluate(self, batch, prefix: str) -> None:
        images, targets = batch
        logits = self(images)
        self.val_acc1(logits, targets)
        self.val_acc5(logits, targets)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, targets), sync_dist=True)
        self.log(f"{prefix}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{prefix}/acc5", self.val_acc5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(images).softmax(-1)
        confidence, label = probs.max(-1)
        return {"label": label, "probability": confidence}

    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.backbone.parameters())
        if self.logger is not None:
            self.logger.log_hyperparams({"params": params}, {"val/acc1": 0.0, "val/loss": 0.0})
        rank_zero_info(f"{type(self.backbone).__name__}: {params:,} parameters")

    def configure_optimizers(self):
        hp = self.hparams
        no_decay = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        decay, keep = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                (keep if name in no_decay or p.ndim <= 1 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total, int(round(hp.warmup_epochs * total / epochs)))

        def factor(step: int) -> float:  # multiplier of lr at optimizer step `step`
            if step < warmup:
                return (hp.warmup_lr + (hp.lr - hp.warmup_lr) * step / warmup) / hp.lr
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return (hp.min_lr + 0.5 * (hp.lr - hp.min_lr) * (1 + math.cos(math.pi * progress))) / hp.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        return [FitSummary()]


class FitSummary(Callback):
    """Prints one line at the end of `fit`: best and final validation top-1, wall time, best checkpoint."""

    def __init__(self):
        self.start, self.best, self.best_epoch = time.time(), None, None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start, self.best, self.best_epoch = time.time(), None, None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        acc = trainer.callback_metrics.get("val/acc1")
        if acc is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        acc = float(acc)
        if self.best is None or acc > self.best:
            self.best, self.best_epoch = acc, trainer.current_epoch

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.time() - self.start
        final = trainer.callback_metrics.get("val/acc1")
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.best is None:
            print(f"Finished fit in {seconds:.0f} s ({trainer.global_step} steps); no validation was run.")
            return
        print(
            f"Finished fit in {seconds:.0f} s ({trainer.global_step} steps): best val/acc1 {100 * self.best:.2f} % "
            f"(epoch {self.best_epoch}), final {100 * float(final):.2f} %"
            + (f"; best checkpoint {ckpt}" if ckpt else "")
        )
