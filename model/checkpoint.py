"""Training checkpoints: weights plus the `ModelConfig` (and the train config) that made them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.errors import CheckpointError, ModelConfigError
from model.network import PixelCAM, build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pixelcam-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


# numpy scalars written by older checkpoints (or by hand) are plain data: let weights_only loading accept them.
_NUMPY_SAFE: list[Any] = [np.float64(0).__reduce__()[0], np.dtype] + [
    type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_)
]


def _plain(config: Any) -> dict[str, Any] | None:
    """A dataclass or mapping as a JSON-plain dict (paths and other objects become strings)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"train_config must be a dataclass or a mapping, got {type(config).__name__}")
    plain: dict[str, Any] = json.loads(json.dumps(dict(config), default=str))
    return plain


def _safe(obj: Any) -> Any:
    """`obj` made loadable by `torch.load(weights_only=True)`: numpy becomes Python/torch, paths become str."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):  # before float: np.float64 subclasses float but does not unpickle safely
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, Mapping):
        return {k: _safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_safe(v) for v in obj) if type(obj) in (list, tuple) else [_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _safe(dataclasses.asdict(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    logger.warning("checkpoint extra: storing %s value %r as its string", type(obj).__name__, obj)
    return str(obj)


def save_checkpoint(
    path: str | Path,
    model: PixelCAM,
    cfg: ModelConfig,
    *,
    train_config: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `{format, format_version, model_config, state_dict, train_config, extra}` atomically to `path`."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_config": _plain(train_config),
        "extra": _safe(dict(extra)) if extra is not None else {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    logger.info("saved checkpoint %s (%s, OS %d)", path, cfg.encoder_name, cfg.output_stride)
    return path


def load_checkpoint(path: str | Path) -> tuple[PixelCAM, ModelConfig, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) from a checkpoint; returns (model, cfg, the whole payload)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the .pt file written by save_checkpoint")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pixelcam checkpoint (no format={CHECKPOINT_FORMAT!r} field)")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}; this pixelcam reads version "
            f"{CHECKPOINT_FORMAT_VERSION}: upgrade pixelcam or re-save the checkpoint"
        )
    try:
        cfg = ModelConfig.from_dict(payload["model_config"])
    except (KeyError, ModelConfigError) as err:
        raise CheckpointError(f"{path} carries no valid model_config: {err}") from err
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: weights do not match its own model_config: {err}") from err
    model.eval()
    return model, cfg, payload
