"""The two PixelCAM heads on the encoder's feature map F (B, C, h, w): image classes and pixel fg/bg."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImageClassifierHead", "PixelHead"]

logger = logging.getLogger(__name__)


class ImageClassifierHead(nn.Module):
    """Dropout2d (training only) -> global average pool -> Linear(C -> K): the image logits (B, K)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, K)."""
        return self.fc(self.dropout(features).mean(dim=(2, 3)))

    def cam(self, features: Tensor, class_idx: int | Tensor) -> Tensor:
        """Class activation map (B, h, w) = sum_k w[c, k] F_k for class `class_idx` (an int or a (B,) tensor)."""
        if isinstance(class_idx, int):
            weights = self.fc.weight[class_idx].expand(features.shape[0], -1)  # (B, C)
        else:
            weights = self.fc.weight[class_idx.long().reshape(-1)]
            if weights.shape[0] != features.shape[0]:
                raise ValueError(
                    f"class_idx has {weights.shape[0]} entries for a batch of {features.shape[0]}; "
                    "give one class index per image or a single int"
                )
        return torch.einsum("bc,bchw->bhw", weights, features)


class PixelHead(nn.Module):
    """One 1x1 conv C -> 2 (channel 0 background, 1 foreground), no dropout: pixel logits (B, 2, h, w).

    `smooth` k > 1 then averages the logits over k x k cells (stride 1, only cells inside the map count), in
    training as at inference: a fixed, parameter-free filter that removes the cell-to-cell speckle a 1x1 head
    leaves on dilated features (docs/training.md).
    """

    def __init__(self, in_channels: int, smooth: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, kernel_size=1)
        self.smooth = int(smooth)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, 2, h, w)."""
        logits = self.conv(features)
        if self.smooth > 1:
            logits = F.avg_pool2d(logits, self.smooth, stride=1, padding=self.smooth // 2, count_include_pad=False)
        return logits
