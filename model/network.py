"""`PixelCAM`: encoder + image head + pixel head, wired once; `build_model` and the paper's lr groups."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from torch import Tensor, nn

from model.config import ModelConfig
from model.encoders import build_encoder
from model.heads import ImageClassifierHead, PixelHead

__all__ = ["PixelCAM", "PixelCAMOutput", "build_model", "param_groups"]

logger = logging.getLogger(__name__)

# Parameter-name prefixes that train at lr x head_lr_ratio on ResNets (the paper's `lr_classifier_ratio` groups).
_FAST_PREFIXES = ("encoder.layer4.", "cls_head.", "pixel_head.")
# EfficientNet-Lite's counterpart of ResNet layer4: its last block and the head convolution (when it has one)
_LITE_FAST_PREFIXES = ("encoder.conv_head.", "encoder.bn1.", "cls_head.", "pixel_head.")


class PixelCAMOutput(NamedTuple):
    """One forward pass: image logits (B, K), pixel logits (B, 2, h, w) and the features F (B, C, h, w)."""

    class_logits: Tensor
    fg_logits: Tensor
    features: Tensor


class PixelCAM(nn.Module):
    """The PixelCAM network: one feature map F feeds the image classifier and the fg/bg pixel classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = build_encoder(cfg)
        self.cls_head = ImageClassifierHead(self.encoder.out_channels, cfg.num_classes, cfg.cls_head_dropout)
        self.pixel_head = PixelHead(self.encoder.out_channels, cfg.pixel_smooth)

    def forward(self, x: Tensor) -> PixelCAMOutput:
        """(B, 3, S, S) normalised RGB -> PixelCAMOutput."""
        features = self.encoder(x)
        return PixelCAMOutput(self.cls_head(features), self.pixel_head(features), features)

    def cam(self, features: Tensor, class_idx: int | Tensor) -> Tensor:
        """The image head's class activation map (B, h, w) for `class_idx`."""
        return self.cls_head.cam(features, class_idx)


def build_model(cfg: ModelConfig) -> PixelCAM:
    """A freshly initialised PixelCAM for `cfg`."""
    model = PixelCAM(cfg)
    logger.debug(
        "built PixelCAM %s width %.2f OS %d: %d parameters",
        cfg.encoder_name, cfg.encoder_width, cfg.output_stride, sum(p.numel() for p in model.parameters()),
    )
    return model


def param_groups(model: PixelCAM, lr: float, head_lr_ratio: float = 10.0) -> list[dict[str, Any]]:
    """Optimizer groups: ResNet layer4 (EfficientNet-Lite: its last stage and head conv) + both heads at
    lr x ratio, the rest at lr; a ViT gets one group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if model.config.encoder_name == "vit_tiny":
        return [{"name": "all", "params": [p for _, p in named], "lr": lr}]
    if model.config.encoder_name.startswith("efficientnet_lite"):
        last = len(model.encoder.blocks) - 1  # type: ignore[arg-type]
        prefixes: tuple[str, ...] = (f"encoder.blocks.{last}.", *_LITE_FAST_PREFIXES)
    else:
        prefixes = _FAST_PREFIXES
    fast = [p for n, p in named if n.startswith(prefixes)]
    base = [p for n, p in named if not n.startswith(prefixes)]
    return [
        {"name": "base", "params": base, "lr": lr},
        {"name": "heads", "params": fast, "lr": lr * head_lr_ratio},
    ]
