"""`ModelConfig`: the frozen description of a PixelCAM network; it travels with every checkpoint and export.

No torch here: the service imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.errors import ModelConfigError

__all__ = [
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_INPUT_MPP",
    "MIN_INPUT_MPP",
    "OUTPUT_STRIDES",
    "VIT_INPUT_SIZE",
    "ModelConfig",
    "config_sha256",
    "is_rgb",
    "lite_variant",
]

logger = logging.getLogger(__name__)

LITE_VARIANT_NAMES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# `<variant>_s5`: the same trunk cut after stage 5 (112 channels x width), whose features separate glands
# from stroma far better than the head convolution's (docs/training.md, "Which layer the heads read")
LITE_TRUNK_SUFFIX = "_s5"
LITE_ENCODERS: tuple[str, ...] = (*LITE_VARIANT_NAMES, *(n + LITE_TRUNK_SUFFIX for n in LITE_VARIANT_NAMES))
ENCODER_NAMES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "vit_tiny", *LITE_ENCODERS)
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
VIT_INPUT_SIZE = 224
# Plausible physical scale of a model input pixel, in microns (a 40x scan is ~0.25, a 1.25x overview ~8).
MIN_INPUT_MPP = 0.05
MAX_PIXEL_SMOOTH = 9  # cells; the service's dense halo must cover it (it adds k // 2 cells of reach)
MAX_INPUT_MPP = 100.0
VIT_OUTPUT_STRIDE = 16
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# EfficientNet-Lite's checkpoints were trained on (x - 127) / 128 of 0..255 RGB: (x - 0.5) / 0.5 on [0, 1]
LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

RGB = tuple[int, int, int]


def lite_variant(encoder_name: str) -> str:
    """The EfficientNet-Lite variant whose ImageNet weights an encoder uses (`efficientnet_lite0_s5` -> lite0)."""
    return encoder_name.removesuffix(LITE_TRUNK_SUFFIX)


def is_rgb(value: Any) -> bool:
    """True for a sequence of exactly three ints in 0..255 (no strings, no bools)."""
    return (
        not isinstance(value, str)
        and isinstance(value, Sequence)
        and len(value) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    )


def _rgb(value: Any, what: str) -> RGB:
    """Return `value` as an (r, g, b) tuple of ints in 0..255, else raise."""
    if not is_rgb(value):
        raise ModelConfigError(f"{what} must be an RGB triplet of three ints in 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _triplet(value: Any, what: str, *, positive: bool) -> tuple[float, float, float]:
    """Return `value` as three finite floats (strictly positive when asked), else raise."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
        raise ModelConfigError(f"{what} must be three floats (one per RGB channel), got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ModelConfigError(f"{what} must be three floats, got {value!r}") from err
    if not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        raise ModelConfigError(f"{what} must be finite{' and > 0' if positive else ''}, got {value!r}")
    return (out[0], out[1], out[2])


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a PixelCAM network and feed it (defaults: the paper's GlaS setting)."""

    encoder_name: str = "resnet18"
    encoder_width: float = 1.0  # channel multiplier; 1.0 = the published architecture
    output_stride: int = 8
    class_names: tuple[str, ...] = ("benign", "malignant")
    class_colors: tuple[RGB, ...] = ((46, 139, 87), (220, 20, 60))
    positive_class: str = "malignant"
    foreground_name: str = "Gland"
    foreground_color: RGB = (255, 140, 0)
    input_size: int = 224  # S: tiles are S x S model-input pixels
    input_mpp: float = 1.0  # microns per model-input pixel
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    cls_head_dropout: float = 0.1  # Dropout2d on the features before the image head, training only
    pixel_smooth: int = 1  # k: pixel logits averaged over k x k cells (1 = none; odd, at most MAX_PIXEL_SMOOTH)

    def __post_init__(self) -> None:
        """Normalise sequence fields to tuples and validate everything."""
        set_ = object.__setattr__
        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence):
            raise ModelConfigError(f"class_names must be a list of names, got {self.class_names!r}")
        set_(self, "class_names", tuple(self.class_names))
        if isinstance(self.class_colors, str) or not isinstance(self.class_colors, Sequence):
            raise ModelConfigError(f"class_colors must be a list of RGB triplets, got {self.class_colors!r}")
        set_(self, "class_colors", tuple(_rgb(c, f"class_colors[{i}]") for i, c in enumerate(self.class_colors)))
        set_(self, "foreground_color", _rgb(self.foreground_color, "foreground_color"))
        set_(self, "mean", _triplet(self.mean, "mean", positive=False))
        set_(self, "std", _triplet(self.std, "std", positive=True))
        self._validate()

    def _validate(self) -> None:
        """Raise `ModelConfigError` naming the first invalid field and how to fix it (encoder fields here)."""
        if self.encoder_name not in ENCODER_NAMES:
            raise ModelConfigError(
                f"unknown encoder_name {self.encoder_name!r}; choose one of {', '.join(ENCODER_NAMES)}"
            )
        if not isinstance(self.encoder_width, int | float) or not 0.0 < float(self.encoder_width) <= 4.0:
            raise ModelConfigError(f"encoder_width must be a float in (0, 4], got {self.encoder_width!r}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ModelConfigError(
                f"output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}"
            )
        if self.encoder_name in LITE_ENCODERS and float(self.encoder_width) != 1.0:
            raise ModelConfigError(
                f"{self.encoder_name} has its own widths (the variant sets them): encoder_width must be 1.0, "
                f"got {self.encoder_width!r}; pick efficientnet_lite0/1/2 (or their _s5 trunks) for a smaller or larger network"
            )
        if self.encoder_name == "vit_tiny":
            if self.output_stride != VIT_OUTPUT_STRIDE:
                raise ModelConfigError(
                    f"vit_tiny has patch size 16, so output_stride must be 16 (got {self.output_stride})"
                )
            if self.input_size != VIT_INPUT_SIZE:
                raise ModelConfigError(
                    f"vit_tiny has a 14x14 position embedding, so input_size must be 224 (got {self.input_size})"
                )
        self._validate_labels_and_scale()

    def _validate_labels_and_scale(self) -> None:
        """Validate input size, classes, colours, foreground, mpp and dropout."""
        if not isinstance(self.input_size, int) or self.input_size < 32 or self.input_size % 32:
            raise ModelConfigError(f"input_size must be a multiple of 32 and >= 32, got {self.input_size!r}")
        if len(self.class_names) < 2 or not all(isinstance(n, str) and n for n in self.class_names):
            raise ModelConfigError(f"class_names needs at least two non-empty names, got {self.class_names!r}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ModelConfigError(f"class_names must be unique, got {self.class_names!r}")
        if len(self.class_colors) != len(self.class_names):
            raise ModelConfigError(
                f"class_colors has {len(self.class_colors)} colours for {len(self.class_names)} classes; "
                "give one RGB triplet per class"
            )
        if self.positive_class not in self.class_names:
            raise ModelConfigError(
                f"positive_class {self.positive_class!r} is not one of class_names {list(self.class_names)}"
            )
        if not isinstance(self.foreground_name, str) or not self.foreground_name:
            raise ModelConfigError("foreground_name must be a non-empty string (e.g. 'Gland' or 'Tumor')")
        if not isinstance(self.input_mpp, int | float) or not MIN_INPUT_MPP <= self.input_mpp <= MAX_INPUT_MPP:
            raise ModelConfigError(
                f"input_mpp must be in [{MIN_INPUT_MPP}, {MAX_INPUT_MPP}] microns per pixel, got {self.input_mpp!r}"
            )
        if not isinstance(self.cls_head_dropout, int | float) or not 0.0 <= self.cls_head_dropout < 1.0:
            raise ModelConfigError(f"cls_head_dropout must be in [0, 1), got {self.cls_head_dropout!r}")
        if (not isinstance(self.pixel_smooth, int) or isinstance(self.pixel_smooth, bool)
                or not 1 <= self.pixel_smooth <= MAX_PIXEL_SMOOTH or self.pixel_smooth % 2 == 0):
            raise ModelConfigError(f"pixel_smooth must be an odd integer in [1, {MAX_PIXEL_SMOOTH}] (cells), got "
                                   f"{self.pixel_smooth!r}")

    @property
    def num_classes(self) -> int:
        """Number of image classes K."""
        return len(self.class_names)

    @property
    def positive_index(self) -> int:
        """Index of `positive_class` in `class_names`."""
        return self.class_names.index(self.positive_class)

    @property
    def fm_size(self) -> int:
        """Side of the output feature map in cells (S / output_stride)."""
        return self.input_size // self.output_stride

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists instead of tuples) that `from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build a config from `to_dict()` output; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(
                f"unknown model config keys {unknown}; known keys are {sorted(known)} "
                "(was this written by a newer version of pixelcam?)"
            )
        kwargs = dict(data)
        for key in ("class_names", "class_colors", "mean", "std", "foreground_color"):
            value = kwargs.get(key)
            if isinstance(value, list):
                kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ModelConfigError(f"cannot build a ModelConfig from {dict(data)!r}: {err}") from err

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config dict in canonical JSON (sorted keys; non-JSON values written with `str`)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
