"""UperNet decode head (Xiao et al., ECCV 2018) and the auxiliary FCN head, as used for ADE20K.

UperNet: a pyramid pooling module (PPM) on the last stage map, a feature pyramid (FPN) that adds each
coarser level into the next finer one, and one fusion convolution over all levels brought to stride 4.
Every convolution is conv (no bias) + BatchNorm + ReLU; Lightning turns BatchNorm into SyncBatchNorm
under DDP with `trainer.sync_batchnorm: true`. Outputs are logits at the finest input stride (4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models.spatial_mamba import ConvNorm


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) map (align_corners=False); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """Average-pools the map to s×s cells for every scale s, projects each by a 1×1 conv and brings it back
    to the input size; returns the input and the pooled maps concatenated along channels."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(int(s)), ConvNorm(in_channels, channels, 1)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(branch(x), size) for branch in self.branches], dim=1)


class UperNetHead(nn.Module):
    """Logits at the stride of the finest input map from a list of maps, finest first.

    Args:
        in_channels: channels of the input maps (the backbone's stages, finest first).
        num_classes: output classes.
        channels: width of every internal map (512 in the paper's recipe).
        pool_scales: PPM grid sizes on the coarsest map.
        dropout: Dropout2d before the 1×1 classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_fuse = ConvNorm(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNorm(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNorm(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNorm(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.laterals) + 1:
            raise ValueError(f"UperNetHead expects {len(self.laterals) + 1} feature maps, got {len(features)}")
        levels = [lat(f) for lat, f in zip(self.laterals, features[:-1])]
        levels.append(self.ppm_fuse(self.ppm(features[-1])))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarser level added into the next finer one
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize(o, size) for o in outs], dim=1))  # (B, L·channels, H/4, W/4) -> (B, channels, ...)
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: `num_convs` 3×3 ConvNorm layers on one map, dropout, 1×1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        convs = [ConvNorm(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))
