"""ONNX export of a PixelCAM network to the model artefact contract, then `onnx.checker`, then a parity check.

The graph takes uint8 NHWC RGB tiles and does the normalisation itself; metadata travels in
`metadata_props["pixelcam"]` (see docs/architecture.md, "The model artefact").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from model.config import ModelConfig, config_sha256
from model.errors import ExportError, InvalidModelError, ParityError
from model.network import PixelCAM, build_model
from model.runtime import (
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ClassInfo,
    ModelMetadata,
    Predictor,
    read_model_metadata,
)

__all__ = ["OnnxWrapper", "build_metadata", "calibrate_batchnorm", "check_parity", "export_onnx", "main", "weights_sha256"]

logger = logging.getLogger(__name__)

OPSET = 17
# Fields of ModelConfig that shape the graph; the rest only describes it and may differ from model.config.
_GRAPH_FIELDS = ("encoder_name", "encoder_width", "output_stride", "input_size", "mean", "std")


class OnnxWrapper(nn.Module):
    """The exported graph: uint8 (B, S, S, 3) RGB -> class_probs (B, K), fg_prob (B, 1, S/k, S/k)."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: PixelCAM, cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.device = next(model.parameters()).device  # buffers and inputs follow the model (CPU or GPU)
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).reshape(shape))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32, device=self.device).reshape(shape))

    def forward(self, tiles: Tensor) -> tuple[Tensor, Tensor]:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (B, 3, S, S) in [0, 1]
        out = self.model((x - self.mean) / self.std)
        class_probs = torch.softmax(out.class_logits, dim=1)
        fg_prob = torch.softmax(out.fg_logits, dim=1)[:, 1:2]
        return class_probs, fg_prob


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (keys sorted; names, dtypes, shapes and raw bytes)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        array = value.detach().cpu().contiguous().numpy()
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _software() -> dict[str, str]:
    """Versions of what produced the artefact."""
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def build_metadata(
    cfg: ModelConfig, *, fg_threshold: float, weights_digest: str, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `pixelcam` metadata document for `cfg`; `provenance` overrides the defaults it names."""
    prov: dict[str, Any] = {
        "dataset": "",
        "train_config_sha256": "",
        "metrics": {},
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights_sha256": weights_digest,
        "software": _software(),
    }
    prov.update(dict(provenance or {}))
    classes = tuple(ClassInfo(n, c) for n, c in zip(cfg.class_names, cfg.class_colors, strict=True))
    meta = ModelMetadata(FORMAT_VERSION, classes, cfg.positive_class, cfg.foreground_name, cfg.foreground_color,
                         cfg.input_size, float(cfg.input_mpp), cfg.output_stride, float(fg_threshold),
                         cfg.encoder_name, prov)
    return meta.to_dict()  # the runtime's own serialiser: one definition of the document layout


def _json_value(obj: Any) -> Any:
    """JSON stand-ins for numpy scalars/arrays, paths and other objects found in provenance."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _check_config_matches(model: PixelCAM, cfg: ModelConfig) -> None:
    """Refuse a cfg whose graph-shaping fields differ from the model's own config."""
    own = getattr(model, "config", None)
    if not isinstance(own, ModelConfig):
        raise ExportError("export_onnx needs a PixelCAM built by model.network.build_model (no .config found)")
    for name in _GRAPH_FIELDS:
        if getattr(own, name) != getattr(cfg, name):
            raise ExportError(
                f"cfg.{name}={getattr(cfg, name)!r} but the model was built with {getattr(own, name)!r}; "
                "pass the model's own config (model.config), changing only descriptive fields"
            )
    if own.num_classes != cfg.num_classes:
        raise ExportError(f"cfg has {cfg.num_classes} classes but the model's head has {own.num_classes}")


def export_onnx(
    model: PixelCAM,
    cfg: ModelConfig,
    path: str | Path,
    *,
    fg_threshold: float = 0.5,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as one self-describing .onnx file at `path` (checked by onnx and by the runtime)."""
    path = Path(path)
    if not 0.0 < fg_threshold < 1.0:
        raise ExportError(f"fg_threshold must be in (0, 1), got {fg_threshold}")
    _check_config_matches(model, cfg)
    was_training = model.training
    wrapper = OnnxWrapper(model, cfg).eval()
    dummy = torch.zeros(1, cfg.input_size, cfg.input_size, 3, dtype=torch.uint8, device=wrapper.device)
    batch_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is chosen on purpose (the dynamo one needs onnxscript).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            # The ViT's 224x224 guard is a Python-constant condition at trace time (S is fixed in the graph).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper, (dummy,), str(tmp), dynamo=False, external_data=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=batch_axes,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        meta = build_metadata(cfg, fg_threshold=fg_threshold, weights_digest=weights_sha256(model),
                              provenance=provenance)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True, default=_json_value)
        proto.producer_name = "pixelcam"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        read_model_metadata(tmp)  # the service's own gate: an export that it would refuse is an export bug
        os.replace(tmp, path)
    except (onnx.checker.ValidationError, InvalidModelError, RuntimeError) as err:
        raise ExportError(f"ONNX export of {cfg.encoder_name} to {path} failed: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    logger.info("exported %s (%s, OS %d, %d bytes)", path, cfg.encoder_name, cfg.output_stride,
                path.stat().st_size)
    return path


def check_parity(
    model: PixelCAM, path: str | Path, tiles_uint8: np.ndarray, atol: float = 1e-4
) -> dict[str, float]:
    """Max abs difference of both outputs, onnxruntime (CPU) vs torch eager on the same tiles; raise above atol."""
    tiles = np.ascontiguousarray(tiles_uint8)
    predictor = Predictor(path, providers=["CPUExecutionProvider"])
    got = predictor.predict(tiles)
    was_training = model.training
    wrapper = OnnxWrapper(model, model.config).eval()
    with torch.no_grad():
        ref_probs, ref_fg = (t.cpu() for t in wrapper(torch.from_numpy(tiles).to(wrapper.device)))
    model.train(was_training)
    diffs = {
        "class_probs": float(np.abs(got.class_probs - ref_probs.numpy()).max()),
        "fg_prob": float(np.abs(got.fg_prob - ref_fg[:, 0].numpy()).max()),
    }
    logger.info("parity of %s on %d tiles: %s", path, len(tiles), diffs)
    worst = max(diffs, key=lambda k: diffs[k])
    if not diffs[worst] <= atol:
        raise ParityError(
            f"onnxruntime and torch differ by {diffs[worst]:.3g} on {worst} (atol {atol:g}) for {path}; "
            "the export is not faithful: check for training-mode layers or unsupported ops"
        )
    return diffs


def calibrate_batchnorm(model: PixelCAM, tiles_uint8: np.ndarray) -> None:
    """Set BatchNorm running statistics to those of `tiles_uint8` (keeps a random model's outputs unsaturated)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    wrapper = OnnxWrapper(model, model.config)
    model.train()
    with torch.no_grad():
        for batch in np.array_split(tiles_uint8, max(1, len(tiles_uint8) // 8)):
            wrapper(torch.from_numpy(np.ascontiguousarray(batch)).to(wrapper.device))
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.eval()


def _smooth_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n uint8 RGB images of blurred colour noise (more image-like than white noise)."""
    coarse = rng.integers(0, 256, (n, size // 16, size // 16, 3), dtype=np.uint8).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    fine += rng.normal(0.0, 20.0, fine.shape).astype(np.float32)
    return np.clip(fine, 0, 255).astype(np.uint8)


def _provenance_from_payload(payload: Mapping[str, Any], dataset: str | None) -> dict[str, Any]:
    """Provenance fields a checkpoint can tell: dataset, train-config hash, metrics."""
    train_config = payload.get("train_config") or {}
    extra = payload.get("extra") or {}
    return {
        "dataset": dataset or str(extra.get("dataset") or train_config.get("dataset") or ""),
        "train_config_sha256": config_sha256(train_config) if train_config else "",
        "metrics": dict(extra.get("metrics") or {}),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--random", action="store_true", help="export a randomly initialised model")
    source.add_argument("--checkpoint", type=Path, help="export the model of this training checkpoint")
    parser.add_argument("out", type=Path, help="path of the .onnx file to write")
    parser.add_argument("--encoder", default="resnet18", help="--random only: encoder name")
    parser.add_argument("--width", type=float, default=0.5, help="--random only: encoder width multiplier")
    parser.add_argument("--output-stride", type=int, default=8, help="--random only: 8, 16 or 32")
    parser.add_argument("--input-mpp", type=float, default=1.0, help="--random only: microns per input pixel")
    parser.add_argument("--seed", type=int, default=0, help="--random only: torch seed of the initialisation")
    parser.add_argument("--fg-threshold", type=float, default=0.5, help="foreground threshold in (0, 1)")
    parser.add_argument("--dataset", default=None, help="dataset name for the provenance record")
    parser.add_argument("--parity-tiles", type=int, default=2, help="random tiles for the parity check (0: skip)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: export a random (BN-calibrated on noise) or trained model, then check parity."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.random:
        torch.manual_seed(args.seed)
        cfg = ModelConfig(encoder_name=args.encoder, encoder_width=args.width,
                          output_stride=16 if args.encoder == "vit_tiny" else args.output_stride,
                          input_mpp=args.input_mpp)
        model = build_model(cfg)
        calibrate_batchnorm(model, _smooth_noise(np.random.default_rng(args.seed), 16, cfg.input_size))
        provenance: dict[str, Any] = {"dataset": args.dataset or "none (random initialisation)",
                                      "metrics": {}, "train_config_sha256": ""}
    else:
        from model.checkpoint import load_checkpoint

        model, cfg, payload = load_checkpoint(args.checkpoint)
        provenance = _provenance_from_payload(payload, args.dataset)
    path = export_onnx(model, cfg, args.out, fg_threshold=args.fg_threshold, provenance=provenance)
    if args.parity_tiles > 0:
        rng = np.random.default_rng(args.seed)
        tiles = _smooth_noise(rng, args.parity_tiles, cfg.input_size)
        check_parity(model, path, tiles)
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
