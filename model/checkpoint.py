"""Training checkpoints: weights plus the `ModelConfig` (and the train config) that made them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.errors import CheckpointError, ModelConfigError
from model.network import PixelCAM, build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pixelcam-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


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
        "extra": dict(extra) if extra is not None else {},
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
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as err:
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
