"""Encoders: dilated ResNet-18/34/50 and a DeiT-tiny-like ViT, each returning one dense feature map (B, C, h, w).

Parameter names follow torchvision (ResNets) and timm (ViT) so that local pretrained state dicts load as they are.
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.config import LITE_ENCODERS, VIT_INPUT_SIZE, ModelConfig
from model.efficientnet import EfficientNetLiteEncoder
from model.errors import InputSizeError, ModelConfigError, PretrainedWeightsError
from model.init import kaiming_init

__all__ = [
    "Encoder",
    "LoadReport",
    "ResNetEncoder",
    "ViTEncoder",
    "build_encoder",
    "load_pretrained",
]

logger = logging.getLogger(__name__)

# Keys of classifier heads in torchvision / timm state dicts: never part of an encoder.
_IGNORED_PREFIXES = ("fc.", "head.", "head_dist.", "dist_token")


def _scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 8)."""
    return max(8, round(channels * width))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34); accepts dilation, unlike torchvision's."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided / dilated) -> 1x1 with a residual (ResNet-50, torchvision v1.5 layout)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_RESNET_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetEncoder(nn.Module):
    """ResNet trunk without its classifier; output stride 8/16/32 by trading stride for dilation in layer3/4."""

    def __init__(self, name: str, width: float = 1.0, output_stride: int = 8):
        super().__init__()
        if name not in _RESNET_SPECS:
            raise ModelConfigError(f"unknown ResNet {name!r}; choose one of {sorted(_RESNET_SPECS)}")
        if output_stride not in (8, 16, 32):
            raise ModelConfigError(f"ResNet output_stride must be 8, 16 or 32, got {output_stride}")
        block, depths = _RESNET_SPECS[name]
        self.name = name
        self.output_stride = output_stride
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # layer3 is dilated at OS 8, layer4 at OS 8 and 16; the first block keeps the previous dilation.
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        self._in_ch = stem
        self._dilation = 1
        self.layer1 = self._make_layer(block, _scaled(64, width), depths[0], 1, False)
        self.layer2 = self._make_layer(block, _scaled(128, width), depths[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, _scaled(256, width), depths[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, _scaled(512, width), depths[3], 2, dilate[2])
        self.out_channels = self._in_ch
        kaiming_init(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, depth: int, stride: int, dilate: bool
    ) -> nn.Sequential:
        """One stage of `depth` blocks; with `dilate`, its stride becomes dilation."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_ch = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        blocks: list[nn.Module] = [block(self._in_ch, planes, stride, previous_dilation, downsample)]
        self._in_ch = out_ch
        blocks += [block(out_ch, planes, 1, self._dilation, None) for _ in range(1, depth)]
        return nn.Sequential(*blocks)


    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised RGB -> (B, out_channels, H/os, W/os)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Attention(nn.Module):
    """Multi-head self-attention written with plain matmuls (exports to any ONNX opset)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d_head)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Transformer feed-forward block (fc1 -> GELU -> fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """16x16 patches -> tokens via one strided conv."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ViTEncoder(nn.Module):
    """DeiT-tiny-like ViT (patch 16, dim 192, depth 12, 3 heads) whose patch tokens form a (B, D, 14, 14) map."""

    patch = 16

    def __init__(self, width: float = 1.0, depth: int = 12, heads: int = 3):
        super().__init__()
        dim = max(heads, round(192 * width / heads) * heads)
        self.name = "vit_tiny"
        self.output_stride = self.patch
        self.grid = VIT_INPUT_SIZE // self.patch
        self.patch_embed = PatchEmbed(self.patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_channels = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, 224, 224) normalised RGB -> (B, D, 14, 14)."""
        if tuple(x.shape[-2:]) != (VIT_INPUT_SIZE, VIT_INPUT_SIZE):
            raise InputSizeError(
                f"vit_tiny takes 224x224 inputs only (fixed 14x14 position embedding), got "
                f"{tuple(x.shape[-2:])}; resize or crop the tiles to 224, or use a ResNet encoder"
            )
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.norm(self.blocks(torch.cat([cls, tokens], dim=1) + self.pos_embed))
        patches = tokens[:, 1:]  # drop the cls token: (B, 196, D)
        # Constant channel and grid sizes keep the exported graph's output shape static except for the batch.
        return patches.transpose(1, 2).reshape(-1, self.out_channels, self.grid, self.grid)


Encoder = ResNetEncoder | ViTEncoder | EfficientNetLiteEncoder


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The encoder named by `cfg`, freshly initialised."""
    if cfg.encoder_name == "vit_tiny":
        return ViTEncoder(width=cfg.encoder_width)
    if cfg.encoder_name in LITE_ENCODERS:
        return EfficientNetLiteEncoder(cfg.encoder_name, output_stride=cfg.output_stride)
    return ResNetEncoder(cfg.encoder_name, width=cfg.encoder_width, output_stride=cfg.output_stride)


class LoadReport(NamedTuple):
    """What `load_pretrained` did: keys the encoder kept at init, and file keys it did not use."""

    missing: list[str]
    unexpected: list[str]


def load_pretrained(encoder: nn.Module, path: str | Path) -> LoadReport:
    """Load a LOCAL torchvision/timm-style state dict into `encoder` (classifier keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights not found at {path}; give the path of a local .pth state dict "
            "(pixelcam never downloads weights)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise PretrainedWeightsError(f"cannot read {path} as a torch state dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a flat state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    own = encoder.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs encoder {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise PretrainedWeightsError(
            f"{len(mismatched)} tensors in {path} do not fit the encoder (first: {mismatched[0]}); the file was "
            "made for another architecture or width: pretrained weights need encoder_width=1.0 and the same encoder"
        )
    result = encoder.load_state_dict(state, strict=False)
    report = LoadReport(list(result.missing_keys), list(result.unexpected_keys))
    if report.missing or report.unexpected:
        logger.warning(
            "pretrained %s: %d missing keys %s, %d unexpected keys %s",
            path, len(report.missing), report.missing[:5], len(report.unexpected), report.unexpected[:5],
        )
    else:
        logger.info("pretrained %s: all %d tensors loaded", path, len(state))
    return report
