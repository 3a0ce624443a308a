"""Object detection and instance segmentation: torchvision's Mask R-CNN on the Spatial-Mamba backbone.

The backbone's four stage maps (features_only, strides 4, 8, 16, 32) go through torchvision's
FeaturePyramidNetwork (256 channels, an extra level by max-pooling, stride 64) into torchvision's `MaskRCNN`
parts: RPN, box head and mask head. Its settings are those of mmdetection's Mask R-CNN config
(`mask-rcnn_r50_fpn`, which the paper's recipe uses) where torchvision's defaults differ:
- RPN proposals kept per image after NMS in training: 1000 (torchvision: 2000);
- RoIAlign sampling ratio 0, i.e. adaptive, ceil(roi size / output size) points per bin (torchvision: 2).
Already equal: anchors 32..512 (one size per level, ratios 0.5 / 1 / 2), RPN IoU thresholds 0.7 / 0.3 with
low-quality matches, 256 anchors sampled per image (half positive), NMS 0.7 and 2000 / 1000 proposals per
level before it in training / test, 1000 after it in test; 512 RoIs sampled per image (a quarter positive,
the ground-truth boxes added), IoU 0.5; box head 2 × 1024 FC, class-specific regression with weights
(10, 10, 5, 5); mask head 4 × 256 convs, deconvolution, 28×28 masks, binary cross-entropy; test: score > 0.05,
NMS 0.5, 100 detections per image, masks binarised at 0.5.
What still differs from mmdetection: box losses are smooth-L1 (beta 1/9, summed over the sampled RoIs and
divided by their number) where mmdetection uses L1; RoIAlign is not `aligned` (no half-pixel offset); low-
quality RPN matches need no minimum IoU (mmdetection: 0.3); RPN proposals are kept above 1e-3 px (0 px);
the FPN convolutions start from kaiming-uniform (xavier-uniform).

`Detector` (LightningModule) owns losses, optimiser and schedule (AdamW, linear warm-up by iterations, steps
by epochs as mmdetection's 1× / 3× schedules), the COCO metrics (torchmetrics `MeanAveragePrecision` with
the pycocotools backend, box and mask AP over all ranks), predictions mapped back to the original images,
and the validation image grid. Resizing, flipping and padding are the data module's (mmdetection's
pipeline), so torchvision's own `GeneralizedRCNNTransform` (resize + normalise) is not used: `forward` calls
the backbone, the RPN and the RoI heads directly on the padded batch.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from src.backward import TrainingThreadBackward
from src.callbacks import FitSummary, ValidationImageGrid, adopt_data_classes
from src.checkpoints import check_architecture, restore_rng_state, rng_states
from src.checks import positive, probability, require
from src.errors import UserError
from src.tb import log_hparams

# names and order of the COCO summary numbers, as mmdetection logs them
AP_KEYS = {"map": "mAP", "map_50": "mAP_50", "map_75": "mAP_75", "map_small": "mAP_s", "map_medium": "mAP_m",
           "map_large": "mAP_l"}


class FeaturePyramid(nn.Module):
    """A features backbone and an FPN over its maps: `forward(images)` -> {"0".."3", "pool"} of
    `out_channels` channels at strides 4, 8, 16, 32 and 64 (the last one max-pooled from stride 32)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256):
        super().__init__()
        dims, out_indices = getattr(backbone, "dims", None), getattr(backbone, "out_indices", None)
        if not getattr(backbone, "features_only", False) or dims is None or out_indices is None:
            raise UserError("model.init_args.backbone must return stage maps: set the backbone's features_only: true "
                             "(a SpatialMamba with features_only exposes dims and out_indices)")
        if list(out_indices) != [0, 1, 2, 3]:
            raise UserError(f"Mask R-CNN reads all four stage maps: the backbone's out_indices must be [0, 1, 2, 3], "
                             f"got {list(out_indices)}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork([dims[i] for i in out_indices], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(images))))


class Float32Outputs(nn.Module):
    """Runs `module` and returns its outputs as float32. Under bf16 autocast the box deltas of the RPN and box
    heads come out bf16, and torchvision's BoxCoder casts the anchors / proposals they are applied to into
    the deltas' dtype: bf16 keeps 8 bits of mantissa, several pixels at 1000 px."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        out = self.module(*args)
        if isinstance(out, torch.Tensor):
            return out.float()
        return type(out)([o.float() for o in x] if isinstance(x, list) else x.float() for x in out)


def detections_to_original(detections: list[dict], image_sizes: Sequence[Sequence[int]],
                           original_sizes: Sequence[Sequence[int]], mask_threshold: float) -> list[dict]:
    """Boxes and masks of the RoI heads (in the resized image) mapped onto the original images: boxes scaled
    and clipped, the 28×28 mask probabilities pasted into their boxes at the original size and binarised."""
    out = []
    for det, size, original in zip(detections, image_sizes, original_sizes):
        size, original = [int(s) for s in size], [int(s) for s in original]
        boxes = resize_boxes(det["boxes"].float(), size, original)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, original[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, original[0])
        result = {"boxes": boxes, "scores": det["scores"].float(), "labels": det["labels"]}
        if "masks" in det:
            masks = paste_masks_in_image(det["masks"].float(), boxes, tuple(original))  # (N, 1, H, W) probabilities
            result["masks"] = masks[:, 0] > mask_threshold
        out.append(result)
    return out


def build_mask_rcnn(backbone: nn.Module, num_classes: int, fpn_channels: int = 256,
                    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_pre_nms_train: int = 2000,
                    rpn_post_nms_train: int = 1000, rpn_pre_nms_test: int = 1000, rpn_post_nms_test: int = 1000,
                    rpn_nms_thresh: float = 0.7, rpn_batch_size: int = 256, rpn_positive_fraction: float = 0.5,
                    roi_batch_size: int = 512, roi_positive_fraction: float = 0.25, roi_sampling_ratio: int = 0,
                    box_head_channels: int = 1024, mask_head_channels: int = 256, mask_head_convs: int = 4,
                    score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100) -> MaskRCNN:
    """torchvision's MaskRCNN on an FPN over `backbone`'s stage maps, with `num_classes` object classes (+ the
    background), set up as in the module docstring."""
    pyramid = FeaturePyramid(backbone, fpn_channels)
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(float(r) for r in anchor_ratios),) * len(anchor_sizes))
    rpn_head = Float32Outputs(RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]))
    box_head = TwoMLPHead(fpn_channels * 7 * 7, box_head_channels)
    return MaskRCNN(
        pyramid, None,  # the class count is in the two predictors
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_train, rpn_post_nms_top_n_train=rpn_post_nms_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_test, rpn_post_nms_top_n_test=rpn_post_nms_test,
        rpn_nms_thresh=rpn_nms_thresh, rpn_batch_size_per_image=rpn_batch_size,
        rpn_positive_fraction=rpn_positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, roi_sampling_ratio), box_head=box_head,
        box_predictor=Float32Outputs(FastRCNNPredictor(box_head_channels, num_classes + 1)),
        box_score_thresh=score_thresh, box_nms_thresh=nms_thresh, box_detections_per_img=detections_per_img,
        box_batch_size_per_image=roi_batch_size, box_positive_fraction=roi_positive_fraction,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, roi_sampling_ratio),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_convs, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
    )


def coco_scores(metric: MeanAveragePrecision, indices: Sequence[int]) -> dict[str, float]:
    """COCO box and mask AP (mAP, mAP_50, mAP_75, mAP_s / m / l, prefixed bbox_ / segm_) of `metric` over the
    whole evaluation set, then the metric is reset. Under torch.distributed every rank's per-image states are
    gathered and put back in dataset order (`indices`: the dataset index of each image this rank updated
    with, in update order; shards may differ in length), scored once on rank 0, and every rank gets the
    numbers. torchmetrics' own sync gathers its list states item by item, which needs equal shards."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    if world > 1:
        local = {name: getattr(metric, name) for name in metric._defaults}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (list(indices), local))
        order = [i for part, _ in gathered for i in part]
        order = sorted(range(len(order)), key=order.__getitem__)
        for name in metric._defaults:
            items = [x for _, states in gathered for x in states[name]]
            setattr(metric, name, [items[i] for i in order])
    scores = [None]
    if world == 1 or torch.distributed.get_rank() == 0:
        values = metric.compute()
        scores = [{f"{kind}_{AP_KEYS[k]}": float(values[f"{kind}_{k}"]) for kind in ("bbox", "segm") for k in AP_KEYS}]
    if world > 1:
        torch.distributed.broadcast_object_list(scores, src=0)
    metric.reset()
    return scores[0]


class Detector(TrainingThreadBackward, L.LightningModule):
    """Mask R-CNN on a features backbone (module docstring): boxes, classes and instance masks.

    Args:
        backbone: returns the 4 stage maps (B, C_i, H/4..H/32, W/4..W/32), finest first, and exposes their
            channels as `dims` and `out_indices` [0, 1, 2, 3] (SpatialMamba with features_only).
        num_classes: object categories (80 for COCO), labelled 1..num_classes (0: background).
        fpn_channels: width of the FPN levels and of every head's input (256).
        anchor_sizes: anchor side on each of the 5 levels (strides 4..64), one size per level.
        anchor_ratios: anchor aspect ratios (height / width) at every position.
        rpn_pre_nms_train: proposals kept per level before NMS in training.
        rpn_post_nms_train: proposals kept per image after NMS in training (mmdetection: 1000).
        rpn_pre_nms_test: proposals kept per level before NMS at test time.
        rpn_post_nms_test: proposals kept per image after NMS at test time.
        rpn_nms_thresh: IoU of the RPN's NMS.
        rpn_batch_size: anchors sampled per image for the RPN losses.
        rpn_positive_fraction: largest share of positives among them.
        roi_batch_size: proposals sampled per image for the box and mask losses.
        roi_positive_fraction: largest share of positives among them.
        roi_sampling_ratio: RoIAlign sampling points per bin side (0: adaptive, as mmdetection).
        box_head_channels: width of the box head's two fully connected layers.
        mask_head_channels: width of the mask head's convolutions.
        mask_head_convs: number of 3×3 convolutions in the mask head.
        score_thresh: detections with a lower class score are dropped at test time.
        nms_thresh: IoU of the per-class NMS at test time.
        detections_per_img: detections kept per image at test time.
        mask_threshold: mask probability above which a pixel belongs to the instance.
        lr: peak learning rate (after warm-up).
        weight_decay: AdamW weight decay.
        no_decay: parameters trained without weight decay: `norms` (every normalisation layer's weight and
            bias, the recipe's) or `norms_biases_ssm` (also all biases and the SSM's A_log and D).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_iters: linear warm-up length in optimizer steps.
        warmup_ratio: the warm-up starts at lr × warmup_ratio.
        milestones: epochs after which the learning rate is multiplied by `gamma` ([8, 11] for 12 epochs).
        gamma: the step factor.
        grid_images: validation images drawn (image | ground truth | prediction) in TensorBoard each
            validation (0: none).
        grid_score_threshold: score above which a detection is drawn in that grid.
        backward_device_thread: the backward on PyTorch's autograd worker thread of the GPU (true) or the
            training thread (false); None (default): the training thread (the backbone runs eagerly; as the
            classifier's, src/backward.py).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 80,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_train: int = 2000,
        rpn_post_nms_train: int = 1000,
        rpn_pre_nms_test: int = 1000,
        rpn_post_nms_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size: int = 256,
        rpn_positive_fraction: float = 0.5,
        roi_batch_size: int = 512,
        roi_positive_fraction: float = 0.25,
        roi_sampling_ratio: int = 0,
        box_head_channels: int = 1024,
        mask_head_channels: int = 256,
        mask_head_convs: int = 4,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_threshold: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        no_decay: Literal["norms", "norms_biases_ssm"] = "norms",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_iters: int = 1000,
        warmup_ratio: float = 1e-3,
        milestones: Sequence[int] = (8, 11),
        gamma: float = 0.1,
        grid_images: int = 4,
        grid_score_threshold: float = 0.3,
        backward_device_thread: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        require(num_classes >= 1, "model.init_args.num_classes", ">= 1", num_classes)
        require(len(anchor_sizes) == 5 and all(s > 0 for s in anchor_sizes), "model.init_args.anchor_sizes",
                "5 positive sizes (one per FPN level, strides 4..64)", list(anchor_sizes))
        require(len(anchor_ratios) >= 1 and all(r > 0 for r in anchor_ratios), "model.init_args.anchor_ratios",
                "positive aspect ratios", list(anchor_ratios))
        for key in ("fpn_channels", "rpn_pre_nms_train", "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test",
                    "rpn_batch_size", "roi_batch_size", "box_head_channels", "mask_head_channels", "mask_head_convs",
                    "detections_per_img"):
            require(int(getattr(self.hparams, key)) >= 1, f"model.init_args.{key}", ">= 1", getattr(self.hparams, key))
        for key in ("rpn_nms_thresh", "rpn_positive_fraction", "roi_positive_fraction", "score_thresh", "nms_thresh",
                    "mask_threshold", "grid_score_threshold", "warmup_ratio"):
            probability(f"model.init_args.{key}", getattr(self.hparams, key))
        require(roi_sampling_ratio >= 0, "model.init_args.roi_sampling_ratio", ">= 0 (0: adaptive)", roi_sampling_ratio)
        positive("model.init_args.lr", lr)
        require(weight_decay >= 0 and warmup_iters >= 0 and 0 < gamma <= 1, "model.init_args.weight_decay, warmup_iters "
                "and gamma", ">= 0, >= 0 and in (0, 1]", [weight_decay, warmup_iters, gamma])
        require(list(milestones) == sorted(milestones) and all(m >= 0 for m in milestones), "model.init_args.milestones",
                "increasing epochs >= 0", list(milestones))
        self.model = build_mask_rcnn(
            backbone, num_classes, fpn_channels, anchor_sizes, anchor_ratios, rpn_pre_nms_train, rpn_post_nms_train,
            rpn_pre_nms_test, rpn_post_nms_test, rpn_nms_thresh, rpn_batch_size, rpn_positive_fraction, roi_batch_size,
            roi_positive_fraction, roi_sampling_ratio, box_head_channels, mask_head_channels, mask_head_convs,
            score_thresh, nms_thresh, detections_per_img)
        # COCO AP of boxes and masks; ranks are gathered by `coco_scores` (in dataset order), not by torchmetrics
        self.val_map = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools", sync_on_compute=False)
        self._val_indices: list[int] = []
        self.class_names = [str(c) for c in range(1, num_classes + 1)]
        self._rng_to_restore = None

    @property
    def backbone(self) -> nn.Module:
        """The features backbone (registered once, inside the FPN wrapper: model.backbone.body)."""
        return self.model.backbone.body

    # ---- set-up ----
    def setup(self, stage: str) -> None:
        adopt_data_classes(self, "categories")

    # ---- forward ----
    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | Sequence[Sequence[int]],
                targets: list[dict] | None = None) -> tuple[list[dict], dict]:
        """Detections (eval: boxes, labels, scores, 28×28 mask probabilities, in the coordinates of the
        unpadded images) and losses (training; `targets` needed) of a padded batch (B, 3, H, W) whose images
        have sizes `image_sizes` (B, 2) before padding."""
        sizes = [(int(h), int(w)) for h, w in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
        features = self.model.backbone(images)
        proposals, rpn_losses = self.model.rpn(ImageList(images, sizes), features, targets)
        detections, head_losses = self.model.roi_heads(features, proposals, sizes, targets)
        return detections, {**rpn_losses, **head_losses}

    @torch.no_grad()
    def predict_instances(self, batch: dict) -> list[dict]:
        """Detections of a batch on its original images: boxes (x1, y1, x2, y2), scores, labels 1..K and
        boolean masks (N, H, W) at the original size."""
        detections, _ = self(batch["images"], batch["image_sizes"])
        return detections_to_original(detections, batch["image_sizes"].tolist(), batch["original_sizes"].tolist(),
                                      self.hparams.mask_threshold)

    # ---- training ----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, losses = self(batch["images"], batch["image_sizes"], batch["targets"])
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(batch["targets"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["targets"]))
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    # ---- evaluation ----
    def _evaluate(self, batch: dict) -> dict:
        predictions = self.predict_instances(batch)
        targets = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool(), "iscrowd": t["iscrowd"],
                    "area": t["area"]} for t in batch["targets"]]
        self.val_map.update([{k: v.cpu() for k, v in p.items()} for p in predictions],
                            [{k: v.cpu() for k, v in t.items()} for t in targets])
        self._val_indices.extend(m["index"] for m in batch["meta"])
        return {"predictions": predictions}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch)

    def on_validation_epoch_start(self) -> None:
        self.val_map.reset()
        self._val_indices = []

    on_test_epoch_start = on_validation_epoch_start

    def _log_metrics(self, prefix: str) -> None:
        scores = coco_scores(self.val_map, self._val_indices)
        self._val_indices = []
        for name, value in scores.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("bbox_mAP", "segm_mAP"), sync_dist=False)
        self.last_scores = scores

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"predictions": [{k: v.cpu() for k, v in p.items()} for p in self.predict_instances(batch)],
                "meta": batch["meta"]}

    # ---- checkpoints: the backbone's architecture and the RNG streams of the RPN / RoI sampling ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if callable(getattr(self.backbone, "architecture", None)):
            checkpoint["architecture"] = self.backbone.architecture()
        checkpoint["rng_states"] = rng_states(self._trainer, with_numpy=False)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if callable(getattr(self.backbone, "architecture", None)) and "architecture" in checkpoint:
            path = (self.trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
            check_architecture(checkpoint["architecture"], self.backbone.architecture(), path)
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        states, self._rng_to_restore = self._rng_to_restore, None
        restore_rng_state(self.trainer, states)

    # ---- fit start, optimiser, schedule ----
    def on_fit_start(self) -> None:
        params = sum(p.numel() for p in self.parameters())
        log_hparams(self.loggers, {"params": params}, ("val/bbox_mAP", "val/segm_mAP"))
        rank_zero_info(f"{type(self.backbone).__name__} + FPN + Mask R-CNN: {params:,} parameters")

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed) trainable parameters under the `no_decay` rule."""
        norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        in_norm = {id(p) for m in self.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
        decay, keep = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = id(p) in in_norm
            if self.hparams.no_decay == "norms_biases_ssm":
                exempt = exempt or p.ndim <= 1 or name.endswith(("A_log", ".D"))
            (keep if exempt else decay).append(p)
        return decay, keep

    def configure_optimizers(self):
        hp = self.hparams
        decay, keep = self.parameter_groups()
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        if not math.isfinite(self.trainer.num_training_batches):
            self.trainer.fit_loop.setup_data()  # the train loader's length (under limit_train_batches)
        per_epoch = max(1, -(-int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches))
        schedule = StepSchedule(hp.warmup_iters, hp.warmup_ratio, [m * per_epoch for m in hp.milestones], hp.gamma)
        # through a plain function: LambdaLR saves a callable object's attributes in checkpoints and restores them
        # over this run's, so a resumed run would keep milestones counted in another run's steps per epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        callbacks = [DetectionSummary(), CocoResultsWriter()]
        if self.hparams.grid_images > 0:
            callbacks.append(DetectionImageGrid(self.hparams.grid_images, self.hparams.grid_score_threshold))
        return callbacks


class StepSchedule:
    """Multiplier of the learning rate at optimizer step `step`: a linear warm-up from `warmup_ratio` over
    `warmup_iters` steps, times `gamma` for every milestone (in steps) reached, as mmdetection's LinearLR +
    MultiStepLR (the step at a milestone already has the lower rate)."""

    def __init__(self, warmup_iters: int, warmup_ratio: float, milestones: Sequence[int], gamma: float):
        self.warmup_iters, self.warmup_ratio, self.milestones, self.gamma = warmup_iters, warmup_ratio, list(milestones), gamma

    def __call__(self, step: int) -> float:
        warm = 1.0 if step >= self.warmup_iters else self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_iters
        return warm * self.gamma ** sum(step >= m for m in self.milestones)


class DetectionSummary(FitSummary):
    """The fit's closing line: best validation box mAP, and the final box and mask mAP (AP50, AP75)."""

    def __init__(self):
        super().__init__("val/bbox_mAP", "val box mAP", percent=False)

    def final(self, trainer, pl_module) -> str:
        s = getattr(pl_module, "last_scores", {})
        return (f"final box mAP {s['bbox_mAP']:.3f} (AP50 {s['bbox_mAP_50']:.3f}, AP75 {s['bbox_mAP_75']:.3f}), "
                f"mask mAP {s['segm_mAP']:.3f} (AP50 {s['segm_mAP_50']:.3f}, AP75 {s['segm_mAP_75']:.3f})") if s else ""


def unnormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) normalised float -> uint8 0..255."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    return (image.float() * std_t + mean_t).clamp(0, 255).round().to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (3, h, w) uint8 image resized (bilinear) to `size`."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return nn.functional.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)


def draw_instances(image: torch.Tensor, instances: dict, names: Sequence[str], score_threshold: float | None) -> torch.Tensor:
    """A (3, H, W) uint8 image with the instances' masks (translucent) and boxes (labelled) drawn; with
    `score_threshold`, only detections scoring above it."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = torch.ones(len(instances["labels"]), dtype=torch.bool)
    if score_threshold is not None and "scores" in instances:
        keep = instances["scores"].cpu() > score_threshold
    labels = instances["labels"].cpu()[keep]
    if not len(labels):
        return image
    palette = [tuple(int(c) for c in np.random.default_rng(int(k)).integers(64, 256, 3)) for k in labels.tolist()]
    if "masks" in instances:
        image = draw_segmentation_masks(image, instances["masks"].cpu()[keep].bool(), alpha=0.45, colors=palette)
    text = [names[k - 1] if 0 < k <= len(names) else str(k) for k in labels.tolist()]
    if "scores" in instances:
        text = [f"{t} {s:.2f}" for t, s in zip(text, instances["scores"].cpu()[keep].tolist())]
    return draw_bounding_boxes(image, instances["boxes"].cpu()[keep], labels=text, colors=palette, width=1)


class DetectionImageGrid(ValidationImageGrid):
    """Each validation: the first `num_images` validation images as rows of image | ground truth | prediction
    (detections above `score_threshold`), written to TensorBoard as `val/grid` (rank 0, not in the sanity check)."""

    def __init__(self, num_images: int = 4, score_threshold: float = 0.3):
        super().__init__(num_images)
        self.score_threshold = score_threshold

    def add_rows(self, trainer, pl_module, outputs, batch) -> None:
        data = trainer.datamodule
        mean, std = getattr(data, "mean", (0.0, 0.0, 0.0)), getattr(data, "std", (1.0, 1.0, 1.0))
        for i, prediction in enumerate(outputs["predictions"]):
            if len(self.rows) >= self.num_images:
                break
            h, w = batch["image_sizes"][i].tolist()
            image = unnormalise(batch["images"][i, :, :h, :w].cpu(), mean, std)
            image = resize_uint8(image, batch["original_sizes"][i].tolist())
            truth = draw_instances(image, batch["targets"][i], pl_module.class_names, None)
            predicted = draw_instances(image, prediction, pl_module.class_names, self.score_threshold)
            self.rows.append(torch.cat([image, truth, predicted], dim=2))  # (3, H, 3W)


def coco_results(predictions: list[dict], metas: list[dict], category_ids: Sequence[int]) -> list[dict]:
    """COCO results-format entries (image_id, category_id, bbox [x, y, w, h], score, segmentation as
    compressed RLE) of per-image predictions; `file_name` is added for images of a predict folder."""
    from pycocotools import mask as mask_utils

    results = []
    for pred, meta in zip(predictions, metas):
        masks = pred["masks"].numpy() if "masks" in pred else None
        for k, (box, score, label) in enumerate(zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist())):
            x1, y1, x2, y2 = box
            entry = {"image_id": int(meta["image_id"]),
                     "category_id": int(category_ids[label - 1]) if category_ids else int(label),
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(score, 5)}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
            if "file_name" in meta:
                entry["file_name"] = meta["file_name"]
            results.append(entry)
    return results


class CocoResultsWriter(BasePredictionWriter):
    """`predict` results as one COCO results-format JSON file (the datamodule's `predict_output`), gathered
    over ranks and written by rank 0; with `predict_draw_dir`, each image with its detections drawn (PNG,
    under its file name)."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.results: list[dict] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.results = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        hp = getattr(trainer.datamodule, "hparams", {})
        if not isinstance(prediction, dict) or not hp.get("predict_output"):
            return
        category_ids = getattr(trainer.datamodule, "category_ids", [])
        self.results.extend(coco_results(prediction["predictions"], prediction["meta"], category_ids))
        if hp.get("predict_draw_dir"):
            self._draw(trainer, pl_module, prediction, batch, hp)

    def _draw(self, trainer, pl_module, prediction, batch, hp) -> None:
        from PIL import Image

        data = trainer.datamodule
        for i, (pred, meta) in enumerate(zip(prediction["predictions"], prediction["meta"])):
            h, w = batch["image_sizes"][i].tolist()
            image = resize_uint8(unnormalise(batch["images"][i, :, :h, :w].cpu(), data.mean, data.std),
                                 meta["original_size"])
            drawn = draw_instances(image, pred, pl_module.class_names, hp["predict_score_threshold"])
            name = meta.get("file_name") or f"{meta['image_id']}"
            target = os.path.join(hp["predict_draw_dir"], os.path.splitext(name)[0] + ".png")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        hp = getattr(trainer.datamodule, "hparams", {})
        if not hp.get("predict_output"):
            return
        results = self.results
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, results)
            results = [r for part in parts for r in part]
        if trainer.is_global_zero:
            results.sort(key=lambda r: (r["image_id"], -r["score"]))
            path = hp["predict_output"]
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f)
            os.replace(path + ".tmp", path)
            rank_zero_info(f"wrote {len(results)} detections to {path}")
