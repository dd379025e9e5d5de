"""Weight initialisation shared by the convolutional encoders."""

from __future__ import annotations

from torch import nn

__all__ = ["kaiming_init"]


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan out, ReLU gain) and unit BatchNorm: torchvision's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
