"""The one door from the service to the training recipe's configuration: `training.config` (torch-free).

A training job's `config` is a set of `TrainConfig` fields. They are checked here at submit, with the recipe's own
`make_config`, so a field that does not exist, has the wrong type, or is out of range is a 422 before anything is
queued. The trainer owns the fields that name places on the server (dataset, manifest, run dir, export name...):
a request may not set them, nor any other text field to a file path. The service never imports torch or the rest
of `training`; the trainer runs the recipe as a subprocess (`python -m training.run`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from typing import Any

from service.errors import InvalidRequest
from training.config import QUICK_OVERRIDES, ConfigError, TrainConfig, make_config

logger = logging.getLogger(__name__)

__all__ = ["TRAINER_FIELDS", "ConfigField", "config_fields", "resolve_config"]

# set by the trainer for every job (or meaningless for a job): a request that names them is refused
TRAINER_FIELDS: dict[str, str] = {
    "dataset": "the trainer trains on the job's slides (dataset: slides)",
    "manifest": "the trainer writes the manifest from the job's slides",
    "run_dir": "each job runs in its own folder on the storage",
    "data_dir": "the job's data are its slides",
    "copy_to": "the trainer registers the model in the models directory",
    "export_name": "the model's name is the job's `name`",
    "resume": "a job starts from the beginning",
    "stage": "a job runs the whole recipe",
    "max_images": "a job trains on all the slides it is given",
}

# the server's bounds on what one job may ask for (the recipe checks the rest)
_LIMITS: dict[str, tuple[float, float]] = {
    "epochs": (1, 1000), "pixelcam_epochs": (1, 1000), "batch_size": (1, 1024), "input_size": (32, 2048),
    "threads": (1, 1024), "seed_rounds": (1, 5), "warmup_epochs": (0, 1000), "eval_every": (1, 1000),
    "lr": (0, 10), "pixelcam_lr": (0, 10), "weight_decay": (0, 10), "valcl_frac": (0, 0.9),
    "encoder_width": (0.01, 4), "input_mpp": (0.05, 100), "source_mpp": (0.05, 100),
}


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One field a request may set: its JSON type, its default (without `quick`) and its bounds."""

    name: str
    kind: type  # int, float, bool, str or list (of str)
    default: Any
    ge: float | None = None
    le: float | None = None


def _kind(annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    if origin is types.UnionType or origin is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if (origin or annotation) in (tuple, list):
        return list
    return annotation if annotation in (int, float, bool, str) else object


def config_fields() -> list[ConfigField]:
    """The TrainConfig fields a request may set, in the recipe's order."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAINER_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, tuple):
            default = list(default)
        lo, hi = _LIMITS.get(f.name, (None, None))
        out.append(ConfigField(f.name, _kind(hints[f.name]), default, lo, hi))
    return out


def _check_value(spec: ConfigField, value: Any) -> None:
    """Type, bounds and no server paths; InvalidRequest saying which field and why."""
    where = f"config.{spec.name}"
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str),
          list: isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)}.get(spec.kind, True)
    if not ok:
        noun = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a list of strings"}[spec.kind]
        raise InvalidRequest(f"{where} must be {noun}, got {value!r}")
    if spec.kind in (int, float):
        if not math.isfinite(float(value)):
            raise InvalidRequest(f"{where} must be a finite number, got {value!r}")
        if (spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le):
            raise InvalidRequest(f"{where} must be between {spec.ge:g} and {spec.le:g}, got {value!r}")
    texts = [value] if isinstance(value, str) else list(value) if spec.kind is list else []
    for text in texts:
        if "/" in text or "\\" in text or text.startswith(".") or text.endswith((".pt", ".pth", ".onnx")):
            raise InvalidRequest(f"{where} names a file ({text!r}); a training job cannot read files of the "
                                 "server: leave it out, or use a name the recipe knows")


def resolve_config(values: dict[str, Any]) -> dict[str, Any]:
    """The request's config checked and resolved to every TrainConfig field (plain JSON data).

    `quick: true` applies the recipe's quick overrides first, as `training/run.py --quick` does; the request's own
    fields win. InvalidRequest with the reason for a reserved, unknown, mistyped or out-of-range field, and for
    whatever the recipe's `make_config` refuses.
    """
    if not isinstance(values, dict):
        raise InvalidRequest(f"config must be a JSON object of TrainConfig fields, got {type(values).__name__}")
    reserved = sorted(set(values) & set(TRAINER_FIELDS))
    if reserved:
        why = "; ".join(f"{name}: {TRAINER_FIELDS[name]}" for name in reserved)
        raise InvalidRequest(f"config sets {', '.join(reserved)}, which the trainer sets for every job ({why}); "
                             "leave them out")
    specs = {spec.name: spec for spec in config_fields()}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise InvalidRequest(f"config has unknown field(s) {', '.join(unknown)}; the fields a training job may set "
                             f"are: {', '.join(specs)}")
    for name, value in values.items():
        _check_value(specs[name], value)
    merged = {**QUICK_OVERRIDES, **values} if values.get("quick") else dict(values)
    try:
        cfg = make_config(merged)
    except ConfigError as err:
        raise InvalidRequest(f"config refused by the training recipe: {err}") from err
    except (TypeError, ValueError) as err:  # a value the recipe cannot even compare: the same answer
        raise InvalidRequest(f"config refused by the training recipe: {type(err).__name__}: {err}") from err
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in TRAINER_FIELDS}
