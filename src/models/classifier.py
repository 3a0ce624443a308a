"""LightningModule for image classification with any backbone (Spatial-Mamba by default).

Beyond cross-entropy + AdamW + warm-up/cosine it carries the published ImageNet recipe as knobs: mixup /
cutmix with soft-target cross-entropy (timm), an EMA of the weights (timm's `ModelEmaV3` with a cheaper
per-step update, `src.ema`; a submodule, so its weights are in every checkpoint and validated separately as
`val_ema/*`), MESA self-distillation
from the EMA model, linear scaling of the learning rate by the global batch, and the RNG states of
every rank in each checkpoint so that a resumed run continues the random stream it was interrupted in.
Gradient clipping and mixed precision are the trainer's (`gradient_clip_val`, `precision`).

Lightning's `WeightAveraging` callback is not used for the EMA: it swaps the averaged weights in for
validation (no separate EMA metrics), copies them over the trained weights at the end of fit, and keeps
the average out of reach of `training_step`, where MESA needs its predictions.
"""

from __future__ import annotations

import math
import os
import random
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import distribute_bn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from src.backward import TrainingThreadBackward
from src.callbacks import FitSummary, PredictionCSVWriter, TrainSpeed
from src.ema import ModelEma
from src.checkpoints import (AtomicCheckpointIO, check_architecture, check_checkpoint_folder, plain,
                             restore_rng_state, rng_states)
from src.checks import non_negative, positive, probability, require
from src.compiling import DEFAULT_MEMORY_BUDGET, CompileCacheWriter, compile_for_training, open_compile_cache
from src.cudagraphs import InferenceGraph, autocast_dtype, graph_training_forward
from src.errors import UserError
from src.tb import log_hparams


class ImageClassifier(TrainingThreadBackward, L.LightningModule):
    """Classifier: AdamW, per-step linear warm-up then cosine decay, top-1/top-5 metrics, and optionally
    mixup/cutmix, EMA of the weights, MESA and linear learning-rate scaling.

    Args:
        backbone: the network mapping images (B, 3, H, W) to logits (B, num_classes).
        num_classes: number of classes (must match the backbone's head and the data).
        lr: peak learning rate (after warm-up); per `lr_base_batch` images when that is set.
        weight_decay: AdamW weight decay, not applied to the backbone's `no_weight_decay()` parameters
            (norms, biases, A_log, D, fusion mixing weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_epochs: linear warm-up length in epochs (may be fractional); stepped per iteration.
        warmup_lr: learning rate at the first step (scaled like lr).
        min_lr: learning rate reached at the end of the cosine decay (scaled like lr).
        label_smoothing: label smoothing of the cross-entropy (of the mixed targets with mixup).
        compile: `torch.compile` the backbone (in place, checkpoint keys unchanged) and its EMA; None = on
            when training on a CUDA GPU, off elsewhere.
        compile_memory_budget: activation memory budget of the compiled training graph, in (0, 1]
            (`torch._functorch.config.activation_memory_budget`, set for the process; see src/compiling.py):
            1 saves what the partitioner saves by default, 0.8 recomputes cheap ops and the SSM op's forward
            in the backward instead — T at batch 128 bf16 peaked at 9.0 GB instead of 12.9 GB at the same
            img/s on an H200. Used only when compiling.
        compile_regional: compile each block on its own (one graph per stage shape, shared by the blocks of
            the stage; src/compiling.py) instead of the whole backbone as one graph. Off by default; with
            compile_parallel and compile_cudagraphs the fastest to start and to train on a GPU (T on an H100:
            first step 30 s after the compile call, 1724-1748 img/s, against about 2 minutes and 1643 img/s for
            the whole graph replayed as CUDA graphs).
        compile_parallel: with compile_regional, compile the stages' block graphs in parallel worker processes
            (one per stage, started at setup, reused for every input shape) before the backbone first runs at a
            new input shape, instead of one after another (src/compiling.py, `ParallelRegionalCompile`): T's cold
            first step on an H100 ended 45-53 s after the compile call instead of 83 s. Off by default.
        compile_ddp_split: under DDP, let dynamo split the compiled graph at DDP's gradient-bucket boundaries
            so that all-reduce overlaps the backward (torch's default), instead of one graph reduced after the
            backward (src/compiling.py). Off by default: on one host the reduce is ~1 ms of a step.
        compile_cudagraphs: replay the compiled graphs as CUDA graphs (`torch.compile` mode "reduce-overhead",
            src/compiling.py): the host no longer launches each kernel, which matters where a slow host CPU
            bounds the step. Costs a recording per new input shape and memory in the graphs' pool. Off by default
            (the ImageNet recipe turns it on); refused with trainer.accumulate_grad_batches > 1.
        compile_cache: a file for torch.compile's cache artifacts (src/compiling.py, `CompileCache`): loaded
            before the first compile if it exists, (re)written by rank 0 after the first training step and
            after each validation when new graphs were compiled. A later run given the same file — on another
            machine with the same GPU type and torch/Triton versions, a restart, the next ablation — skips
            inductor's work for the graphs it holds. None (default): no file. Used only when compiling.
        eager_cudagraphs: no torch.compile; on a CUDA GPU the backbone's training forward and backward (eager
            kernels) are recorded as CUDA graphs at the first training step and replayed for every batch of
            that shape, and so is the MESA teacher's forward (src/cudagraphs.py). No inductor compile at the
            start; the eager step recorded as one graph trained T at 1580 img/s with the Triton LayerNorms (the
            backbone's fused_norms) on an H100 (benchmarks/RESULTS.md). `compile: null` then means off;
            `compile: true` with it is refused, and so is trainer.accumulate_grad_batches > 1 (on any device).
            The recording puts back the BatchNorm statistics and random-number state its warm-up passes used,
            so a resumed run continues bit for bit. Ignored on other devices.
        backward_device_thread: run each step's backward on PyTorch's autograd worker thread of the GPU
            (PyTorch's default; true) or on the training thread (false). None (default): the worker thread when
            the backbone is compiled, else the training thread (src/backward.py) — eager T's step, bound by the
            host, took 113 ms on the worker against 78 ms on the training thread (one H200).
        channels_last: on a CUDA GPU, keep the backbone's conv weights and the images channels-last (NHWC), the
            layout the blocks compute in, and step with the fused AdamW — on an H200 the recipe trained 27 %
            slower with NCHW images and the foreach AdamW than with this. Ignored on other devices.
        lr_base_batch: linear scaling: lr, warmup_lr and min_lr are multiplied by global batch /
            lr_base_batch, global batch = data batch_size × devices × nodes × accumulate_grad_batches
            (the published recipe: 5e-4 per 512). None: no scaling.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        mixup_prob: probability of mixing a batch at all.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        mixup_mode: "batch" (one λ per batch), "pair" or "elem" (timm Mixup modes).
        ema_decay: decay of the exponential moving average of the weights, updated after every optimizer
            step (the published recipe: 0.9999); None: no EMA.
        mesa: weight of MESA self-distillation, loss += mesa × CE(logits, softmax(EMA logits)) on the same
            (mixed) images (published: 1.0 / 1.5 / 2.0 for T / S / B); 0: off. Needs ema_decay.
        mesa_start: fraction of training after which MESA is on (epoch ≥ int(mesa_start × max_epochs)).
        dist_bn: with several processes, make BatchNorm running statistics equal on all ranks before each
            validation: "reduce" (average them), "broadcast" (rank 0's) or "" (leave them).
        predict_ema: `predict` with the EMA weights (when there is an EMA).
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
        compile_memory_budget: float = DEFAULT_MEMORY_BUDGET,
        compile_regional: bool = False,
        compile_parallel: bool = False,
        compile_ddp_split: bool = False,
        compile_cudagraphs: bool = False,
        compile_cache: str | None = None,
        eager_cudagraphs: bool = False,
        backward_device_thread: bool | None = None,
        channels_last: bool = True,
        lr_base_batch: int | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        ema_decay: float | None = None,
        mesa: float = 0.0,
        mesa_start: float = 0.25,
        dist_bn: str = "reduce",
        predict_ema: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        head = getattr(backbone, "num_classes", num_classes)
        if head != num_classes:
            raise UserError(
                f"model.init_args.num_classes={num_classes} but the backbone's head has {head} classes; "
                "set both to the number of classes of the data"
            )
        if mesa > 0 and not ema_decay:
            raise UserError(f"model.init_args.mesa={mesa} distils from the EMA model; set model.init_args.ema_decay too")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise UserError(f"model.init_args.ema_decay must be in (0, 1) or null, got {ema_decay}")
        if dist_bn not in ("reduce", "broadcast", ""):
            raise UserError(f"model.init_args.dist_bn must be 'reduce', 'broadcast' or '', got {dist_bn!r}")
        if not lr > 0:
            raise UserError(f"model.init_args.lr must be > 0 (the peak learning rate), got {lr}")
        for name, value in (("warmup_lr", warmup_lr), ("min_lr", min_lr)):
            if not 0 <= value <= lr:
                raise UserError(f"model.init_args.{name} must be in [0, lr={lr}], got {value}")
        if lr_base_batch is not None and lr_base_batch < 1:
            raise UserError(f"model.init_args.lr_base_batch must be a positive number of images, got {lr_base_batch}")
        key = "model.init_args."
        require(num_classes >= 2, key + "num_classes", ">= 2 (a classifier needs two classes)", num_classes)
        non_negative(key + "weight_decay", weight_decay)
        require(len(betas) == 2 and all(0 <= b < 1 for b in betas), key + "betas", "two numbers in [0, 1)", list(betas))
        positive(key + "eps", eps)
        if eager_cudagraphs and compile:
            raise UserError("model.init_args.eager_cudagraphs records the eager kernels as CUDA graphs instead of "
                            "compiling; set model.init_args.compile to null or false (or compile_cudagraphs: true "
                            "for compiled graphs replayed as CUDA graphs)")
        require(not isinstance(compile_memory_budget, bool) and 0 < compile_memory_budget <= 1,
                key + "compile_memory_budget", "a number in (0, 1]", compile_memory_budget)
        non_negative(key + "warmup_epochs", warmup_epochs)
        require(0 <= label_smoothing < 1, key + "label_smoothing", "in [0, 1)", label_smoothing)
        for name, value in (("mixup", mixup), ("cutmix", cutmix), ("mesa", mesa)):
            non_negative(key + name, value)
        for name, value in (("mixup_prob", mixup_prob), ("mixup_switch_prob", mixup_switch_prob), ("mesa_start", mesa_start)):
            probability(key + name, value)
        require(mixup_mode in ("batch", "pair", "elem"), key + "mixup_mode", "'batch', 'pair' or 'elem'", mixup_mode)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.soft_target_ce = SoftTargetCrossEntropy()
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                                  mode=mixup_mode, label_smoothing=label_smoothing, num_classes=num_classes)
            self.criterion = self.soft_target_ce
        self.ema = None
        if ema_decay:
            self.ema = ModelEma(backbone, decay=ema_decay)
            self.ema.requires_grad_(False)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))
        self.val_loss = MeanMetric()
        if self.ema is not None:
            # the EMA teacher stays in eval mode while the rest trains; Lightning warns about that at fit start
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            self.ema_acc1 = MulticlassAccuracy(num_classes, top_k=1)
            self.ema_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))
            self.ema_loss = MeanMetric()
        self.lr_scale = 1.0
        self._rng_to_restore = None
        self._trained = False  # weights from a checkpoint or from training steps (not only the initialisation)
        self._graphed, self._teacher_graph = False, None  # eager_cudagraphs: recorded at the first training step
        self._compile_cache = None  # compile_cache: a CompileCache once compiling (setup)

    # ---- set-up ----
    def setup(self, stage: str) -> None:
        if self._trainer is not None and type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # atomic saves (a kill mid-save keeps the previous file) and weights-only loads, in every config
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and self._trainer is not None and self.trainer.is_global_zero:
            for callback in self.trainer.checkpoint_callbacks:  # their folders are resolved by now (callback setup)
                if callback.dirpath and "://" not in str(callback.dirpath):
                    check_checkpoint_folder(callback.dirpath)
        data_classes = getattr(self.trainer.datamodule, "num_classes", 0) if self._trainer is not None else 0
        if data_classes and data_classes != self.hparams.num_classes:
            raise UserError(
                f"the data has {data_classes} classes but model.init_args.num_classes={self.hparams.num_classes}; "
                "set model.init_args.num_classes and the backbone's num_classes to the number of class folders"
            )
        if stage == "fit" and self.mixup_fn is not None:
            batch = self._batch_size()
            if batch is not None and batch % 2:
                raise UserError(f"mixup/cutmix mixes each batch with its flip and needs an even data.batch_size, got {batch}")
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self.hparams.eager_cudagraphs and accumulate > 1:
            raise UserError(
                f"model.init_args.eager_cudagraphs with gradient accumulation (trainer.accumulate_grad_batches="
                f"{accumulate}): the recorded backward writes its gradients into the graph's own buffers, which the "
                "next micro-batch's replay overwrites, so accumulated gradients would be wrong; set "
                "model.init_args.eager_cudagraphs false or trainer.accumulate_grad_batches 1")
        on_gpu = self.device.type == "cuda" or (
            self._trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        if on_gpu and self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            if self.ema is not None:
                self.ema.to(memory_format=torch.channels_last)
        if self._use_compile(on_gpu) and not getattr(self, "_compiled", False):
            if self.hparams.compile_cache:
                self._compile_cache = open_compile_cache(self.hparams.compile_cache)
            compile_for_training(self.backbone, self.ema.module if self.ema is not None else None,
                                 memory_budget=self.hparams.compile_memory_budget,
                                 regional=self.hparams.compile_regional, ddp_split=self.hparams.compile_ddp_split,
                                 cudagraphs=self.hparams.compile_cudagraphs, parallel=self.hparams.compile_parallel,
                                 accumulate_grad_batches=accumulate,
                                 key="model.init_args.compile_memory_budget")
            self._compiled = True

    def _use_compile(self, on_gpu: bool) -> bool:
        """`compile`, where null means: on a CUDA GPU, unless `eager_cudagraphs` records the eager kernels instead."""
        if self.hparams.compile is None:
            return on_gpu and not self.hparams.eager_cudagraphs
        return self.hparams.compile

    def _batch_size(self) -> int | None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "hparams", {}).get("batch_size") if dm is not None else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()  # the teacher runs without drop path and with BatchNorm running statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """Images channels-last on the GPU (see `channels_last`): one copy here instead of one in the stem."""
        if self.hparams.channels_last and images.is_cuda and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    # ---- training ----
    def mesa_active(self) -> bool:
        if self.hparams.mesa <= 0 or self.ema is None:
            return False
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs > 0:
            return self.current_epoch >= int(self.hparams.mesa_start * epochs)
        return self.global_step >= int(self.hparams.mesa_start * self.trainer.estimated_stepping_batches)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        images = self._layout(images)
        if self.mixup_fn is not None:
            images, soft_targets = self.mixup_fn(images, targets)  # (B, num_classes) mixed, smoothed targets
        graphs = self.hparams.eager_cudagraphs and images.is_cuda
        if graphs and not self._graphed:
            graph_training_forward(self.backbone, images, autocast_dtype())
            self._graphed = True
        logits = self(images)
        loss = self.criterion(logits, soft_targets if self.mixup_fn is not None else targets)
        if self.mesa_active():
            with torch.no_grad():
                if graphs and self._teacher_graph is None:
                    self._teacher_graph = InferenceGraph(self.ema.module, images, autocast_dtype())
                teacher = (self._teacher_graph if graphs else self.ema.module)(images).float().softmax(-1)
            mesa_loss = self.soft_target_ce(logits.float(), teacher)
            self.log("train/mesa_loss", mesa_loss)
            loss = loss + self.hparams.mesa * mesa_loss
        if self.mixup_fn is None:
            self.train_acc(logits, targets)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning refuses to clip for a fused optimizer (it would unscale fp16 gradients itself); the fused
        AdamW is used only without loss scaling, where the gradients are the true ones: clip them here."""
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused"):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._trained = True
        if self.ema is not None:  # here, not in on_train_batch_end: checkpoints saved then must include it
            self.ema.update(self.backbone)

    # ---- evaluation ----
    def _evaluate(self, batch, prefix: str) -> None:
        images, targets = batch
        images = self._layout(images)
        models = [("", self, self.val_acc1, self.val_acc5, self.val_loss)]
        if self.ema is not None:
            models.append(("_ema", self.ema.module, self.ema_acc1, self.ema_acc5, self.ema_loss))
        for suffix, model, acc1, acc5, loss in models:
            logits = model(images)
            acc1(logits, targets)
            acc5(logits, targets)
            loss(F.cross_entropy(logits.float(), targets), len(targets))
            self.log(f"{prefix}{suffix}/loss", loss)
            self.log(f"{prefix}{suffix}/acc1", acc1, prog_bar=True)
            self.log(f"{prefix}{suffix}/acc5", acc5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        world = self.trainer.world_size
        if world > 1 and self.hparams.dist_bn and torch.distributed.is_initialized():
            for module in (self.backbone, self.ema):
                if module is not None:
                    distribute_bn(module, world, reduce=self.hparams.dist_bn == "reduce")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = self._layout(batch[0] if isinstance(batch, (list, tuple)) else batch)
        model = self.ema.module if self.hparams.predict_ema and self.ema is not None else self.backbone
        probs = model(images).float().softmax(-1)
        confidence, label = probs.max(-1)
        out = {"label": label, "probability": confidence}
        if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], (list, tuple)):
            out["path"] = list(batch[1])  # ImageFolderDataModule's predict set: (images, paths)
        return out

    # ---- fit start, optimiser, schedule ----
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.backbone.parameters())
        # metric columns declared without placeholder scalars; ExperimentMetrics' fuller record wins if attached
        log_hparams(self.loggers, {"params": params}, ("val/acc1", "val/loss"))
        rank_zero_info(f"{type(self.backbone).__name__}: {params:,} parameters")
        rank = self.trainer.global_rank
        if rank > 0:  # each rank its own drop-path masks and mixup draws (resume restores each rank's stream)
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) + rank
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    def configure_optimizers(self):
        hp = self.hparams
        no_decay = set(getattr(self.backbone, "no_weight_decay", lambda: set())())
        decay, keep = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                (keep if name in no_decay or p.ndim <= 1 else decay).append(p)
        self.lr_scale = 1.0
        if hp.lr_base_batch is not None:
            batch = self._batch_size()
            if batch is None:
                raise UserError("model.init_args.lr_base_batch needs a datamodule with a batch_size to scale the lr by")
            world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
            global_batch = batch * world * accumulate
            self.lr_scale = global_batch / hp.lr_base_batch
            rank_zero_info(
                f"global batch {global_batch} = {batch} per device × {world} devices × {accumulate} accumulation; "
                f"lr {hp.lr * self.lr_scale:.3g} (= {hp.lr:g} × {global_batch}/{hp.lr_base_batch}), "
                f"warm-up from {hp.warmup_lr * self.lr_scale:.3g}, cosine to {hp.min_lr * self.lr_scale:.3g}"
            )
        lr, warmup_lr, min_lr = (v * self.lr_scale for v in (hp.lr, hp.warmup_lr, hp.min_lr))
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=lr, betas=tuple(hp.betas), eps=hp.eps,
            # one kernel for all parameters on the GPU (the per-tensor loop costs the host several ms a step)
            # (fp16's loss scaling excluded: the gradients are clipped before the scaler unscales them)
            fused=bool(hp.channels_last and decay and all(p.is_cuda for p in decay + keep)
                       and "16-mixed" != str(self.trainer.precision)) or None,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total, int(round(hp.warmup_epochs * total / epochs)))

        def factor(step: int) -> float:  # multiplier of lr at optimizer step `step`
            if step < warmup:
                return (warmup_lr + (lr - warmup_lr) * step / warmup) / lr
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            self._apply_optimiser_values()

    def _apply_optimiser_values(self) -> None:
        """A resumed optimiser and scheduler hold the checkpoint's lr, betas, eps and weight decay; the config's
        values (and the lr scaled by this run's global batch) replace them, so a new `--model.init_args.lr` on
        resume takes effect. Warm-up length, min_lr and max_epochs act through the schedule, rebuilt from the config."""
        hp, optimizer = self.hparams, self.optimizers(use_pl_optimizer=False)
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        lr, changed = hp.lr * self.lr_scale, []
        for group, weight_decay in zip(optimizer.param_groups, (hp.weight_decay, 0.0)):
            for key, value in (("weight_decay", weight_decay), ("betas", tuple(hp.betas)), ("eps", hp.eps)):
                if plain(group[key]) != plain(value):
                    changed.append(f"{key} {group[key]} -> {value}")
                    group[key] = value
        if scheduler is not None and any(base != lr for base in scheduler.base_lrs):
            changed.append(f"peak lr {scheduler.base_lrs[0]:.4g} -> {lr:.4g}")
            scheduler.base_lrs = [lr] * len(optimizer.param_groups)
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if changed:
            rank_zero_info("resumed with the config's optimiser values instead of the checkpoint's: " + ", ".join(sorted(set(changed))))

    def _warn_if_untrained(self) -> None:
        if not self._trained and not getattr(self.backbone, "pretrained", None):
            rank_zero_warn(
                f"{self.trainer.state.fn.value} runs on RANDOMLY INITIALISED weights: no --ckpt_path and no "
                "model.init_args.backbone.init_args.pretrained were given, so its results mean nothing"
            )

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self._warn_if_untrained()

    def on_test_start(self) -> None:
        self._warn_if_untrained()

    def on_predict_start(self) -> None:
        self._warn_if_untrained()

    def configure_callbacks(self):
        # TrainSpeed: train/img_per_s, and compile_s when the backbone is compiled (setup above)
        return [StopOnNonFiniteLoss(), ClassifierSummary(), PredictionCSVWriter(), TrainSpeed(), CompileCacheWriter()]

    # ---- checkpoints: EMA weights are in state_dict (ema.module.*); add RNG streams and MESA ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain types and tensors only: checkpoints are read with torch.load(weights_only=True) (src.checkpoints)
        checkpoint["rng_states"] = rng_states(self._trainer)
        if callable(getattr(self.backbone, "architecture", None)):
            checkpoint["architecture"] = self.backbone.architecture()
        if self.hparams.mesa > 0 and self._trainer is not None:
            epochs = self.trainer.max_epochs or 0
            checkpoint["mesa"] = {"weight": self.hparams.mesa, "start_epoch": int(self.hparams.mesa_start * epochs),
                                  "active": self.mesa_active()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = (self.trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
        if callable(getattr(self.backbone, "architecture", None)):
            if "architecture" in checkpoint:
                check_architecture(checkpoint["architecture"], self.backbone.architecture(), path)
            else:
                rank_zero_warn(f"{path} does not record the backbone's architecture (written by an older version); "
                               "make sure dims/depths/dilations/scan/... in the config are the ones it was trained with")
        saved = checkpoint.get("hyper_parameters") or {}
        differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in self.hparams.items()
                  if k in saved and not k.startswith("_") and plain(saved[k]) != plain(v)]
        if differ:
            rank_zero_info(f"the config's values are used where they differ from {path}'s: {', '.join(differ)}")
        self._trained = True
        sd = checkpoint.get("state_dict", {})
        has_ema = any(k.startswith("ema.") for k in sd)
        if self.ema is not None and not has_ema:
            rank_zero_warn("the checkpoint has no EMA weights; the EMA starts from its model weights")
            sd.update({"ema.module." + k.removeprefix("backbone."): v for k, v in list(sd.items()) if k.startswith("backbone.")})
        elif self.ema is None and has_ema:
            for k in [k for k in sd if k.startswith("ema.")]:
                del sd[k]
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        restore_rng_state(self.trainer, states)


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover from here. A user error (one line, exit 2):
    what fixes it is a setting (learning rate, warm-up, clipping, precision)."""


class StopOnNonFiniteLoss(Callback):
    """Stops `fit` with one line naming the step when the training loss is NaN or infinite, before a checkpoint
    of the broken weights is written, instead of training on to a meaningless accuracy.

    On the CPU each step's loss is checked at its end. On a GPU, reading the loss at the end of its step would
    make the host wait for the device every step (the host's work before the next step would then always run
    with the device idle), so each step's verdict is copied to the host asynchronously and read at the end of
    the next step, when the device is done with it; the verdicts still in flight are read, waiting for them,
    before any checkpoint is saved (`on_save_checkpoint` runs before the file is written), before validation
    and at the end of training. A NaN step is thus reported at most one step late and never checkpointed."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, torch.Tensor, object, tuple[int, int, int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        where = (trainer.global_step, trainer.current_epoch, batch_idx)
        finite = torch.isfinite(loss.detach()).all()
        value = loss.detach().float().reshape(-1)[:1]  # for the message
        if loss.device.type != "cuda":
            self._pending.append((value, finite, None, where))
            self._check()
            return
        self._check(wait=False)  # the earlier steps' verdicts, as far as the device has got
        host_loss = torch.empty(1, pin_memory=True).copy_(value, non_blocking=True)
        host_finite = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host_loss, host_finite, event, where))
        while len(self._pending) > 1:  # at most one step unread: the previous one, which the device has finished
            self._check_first()

    def _check_first(self) -> None:
        loss, finite, event, (step, epoch, batch_idx) = self._pending.pop(0)
        if event is not None:
            event.synchronize()
        if not bool(finite):
            raise NonFiniteLossError(
                f"the training loss is {float(loss[0])} at optimizer step {step} (epoch {epoch}, batch "
                f"{batch_idx}); try a lower model.init_args.lr, a longer model.init_args.warmup_epochs, "
                "trainer.gradient_clip_val (e.g. 5.0), or trainer.precision bf16-mixed / 32-true instead of "
                "16-mixed, and resume from the last good checkpoint"
            )

    def _check(self, wait: bool = True) -> None:
        """Read the verdicts in flight: all of them (waiting for the device) or those it has passed."""
        while self._pending and (wait or self._pending[0][2] is None or self._pending[0][2].query()):
            self._check_first()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._check()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check()

    def on_train_end(self, trainer, pl_module) -> None:
        self._check()


class ClassifierSummary(FitSummary):
    """The fit's closing line: best and final validation top-1, and the EMA's top-1."""

    def __init__(self):
        super().__init__("val/acc1")

    def final(self, trainer, pl_module) -> str:
        ema = trainer.callback_metrics.get("val_ema/acc1")
        return super().final(trainer, pl_module) + (f", EMA {self.score(ema)}" if ema is not None else "")
