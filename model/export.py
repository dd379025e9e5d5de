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
    DENSE_OUTPUT,
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ClassInfo,
    ModelMetadata,
    Predictor,
    read_model_metadata,
)

__all__ = ["OnnxWrapper", "build_metadata", "calibrate_batchnorm", "check_parity", "export_onnx", "main",
           "supports_dense", "upgrade_to_dense", "weights_sha256"]

logger = logging.getLogger(__name__)

OPSET = 17
# Fields of ModelConfig that shape the graph; the rest only describes it and may differ from model.config.
_GRAPH_FIELDS = ("encoder_name", "encoder_width", "output_stride", "input_size", "mean", "std")


def supports_dense(cfg: ModelConfig) -> bool:
    """Whether the encoder is fully convolutional, so the artefact can be format version 2 (dense)."""
    return cfg.encoder_name != "vit_tiny"  # the ViT's position embeddings fix its input at 224 px


class OnnxWrapper(nn.Module):
    """The exported graph: uint8 (B, H, W, 3) RGB -> class_probs (B, K), fg_prob (B, 1, H/k, W/k), and with
    `dense`, class_logits (B, K, H/k, W/k): the classifier applied at every cell before pooling (a GAP + linear
    head's logits are exactly the mean of this map)."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: PixelCAM, cfg: ModelConfig, dense: bool = False):
        super().__init__()
        self.model = model
        self.dense = dense
        self.device = next(model.parameters()).device  # buffers and inputs follow the model (CPU or GPU)
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).reshape(shape))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32, device=self.device).reshape(shape))

    def forward(self, tiles: Tensor) -> tuple[Tensor, ...]:
        x = tiles.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (B, 3, H, W) in [0, 1]
        out = self.model((x - self.mean) / self.std)
        class_probs = torch.softmax(out.class_logits, dim=1)
        fg_prob = torch.softmax(out.fg_logits, dim=1)[:, 1:2]
        if not self.dense:
            return class_probs, fg_prob
        fc = self.model.cls_head.fc
        logit_map = nn.functional.conv2d(out.features, fc.weight[:, :, None, None], fc.bias)
        return class_probs, fg_prob, logit_map


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
    cfg: ModelConfig, *, fg_threshold: float, weights_digest: str, provenance: Mapping[str, Any] | None = None,
    format_version: int = FORMAT_VERSION,
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
    meta = ModelMetadata(format_version, classes, cfg.positive_class, cfg.foreground_name, cfg.foreground_color,
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
    dense: bool | None = None,
) -> Path:
    """Write `model` as one self-describing .onnx file at `path` (checked by onnx and by the runtime).

    `dense` (default: whenever the encoder is fully convolutional) writes format_version 2; False writes
    version 1 (fixed tile size, no class_logits), which older pixelcam releases read.
    """
    path = Path(path)
    if not 0.0 < fg_threshold < 1.0:
        raise ExportError(f"fg_threshold must be in (0, 1), got {fg_threshold}")
    _check_config_matches(model, cfg)
    was_training = model.training
    if dense and not supports_dense(cfg):
        raise ExportError(f"{cfg.encoder_name} takes {cfg.input_size} px inputs only: it cannot be exported dense")
    dense = supports_dense(cfg) if dense is None else dense
    wrapper = OnnxWrapper(model, cfg, dense=dense).eval()
    dummy = torch.zeros(1, cfg.input_size, cfg.input_size, 3, dtype=torch.uint8, device=wrapper.device)
    output_names = [*OUTPUT_NAMES, DENSE_OUTPUT] if dense else list(OUTPUT_NAMES)
    if dense:
        cells = {0: "batch", 2: "cells_y", 3: "cells_x"}
        axes = {INPUT_NAME: {0: "batch", 1: "height", 2: "width"}, OUTPUT_NAMES[0]: {0: "batch"},
                OUTPUT_NAMES[1]: cells, DENSE_OUTPUT: cells}
    else:
        axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
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
                input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=axes,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        meta = build_metadata(cfg, fg_threshold=fg_threshold, weights_digest=weights_sha256(model),
                              provenance=provenance, format_version=2 if dense else 1)
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
        ref_probs, ref_fg = (t.cpu() for t in wrapper(torch.from_numpy(tiles).to(wrapper.device))[:2])
    model.train(was_training)
    diffs = {
        "class_probs": float(np.abs(got.class_probs - ref_probs.numpy()).max()),
        "fg_prob": float(np.abs(got.fg_prob - ref_fg[:, 0].numpy()).max()),
    }
    if predictor.metadata.dense:  # the dense outputs on a region of 2 x 2 tiles, against torch on the same pixels
        region = np.concatenate([np.concatenate([tiles[i % len(tiles)], tiles[(i + 1) % len(tiles)]], axis=1)
                                 for i in range(2)], axis=0)[None]
        dense_got = predictor.predict_dense(np.ascontiguousarray(region))
        with torch.no_grad():
            _, ref_fg_map, ref_logits = OnnxWrapper(model, model.config, dense=True).eval()(
                torch.from_numpy(region).to(wrapper.device))
        model.train(was_training)
        diffs["dense_fg_prob"] = float(np.abs(dense_got.fg_prob - ref_fg_map[:, 0].cpu().numpy()).max())
        ref = ref_logits.cpu().numpy()
        # logits are unbounded: their difference is judged relative to their scale (probabilities absolutely)
        diffs["class_logits"] = float(np.abs(dense_got.class_logits - ref).max() / max(1.0, float(np.abs(ref).max())))
    logger.info("parity of %s on %d tiles: %s", path, len(tiles), diffs)
    worst = max(diffs, key=lambda k: diffs[k])
    if not diffs[worst] <= atol:
        raise ParityError(
            f"onnxruntime and torch differ by {diffs[worst]:.3g} on {worst} (atol {atol:g}) for {path}; "
            "the export is not faithful: check for training-mode layers or unsupported ops"
        )
    return diffs


def upgrade_to_dense(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a format-version-1 artefact as version 2 (dense) without touching its weights.

    The graph gains `class_logits` (B, K, H/k, W/k): a 1 x 1 convolution of the encoder's feature map (the input
    of the classifier's global average pool) with the classifier's own weight and bias; the input's height and
    width become free. Every other node and initializer is kept, so tile-sized inputs give bit-identical
    `class_probs` and `fg_prob`. Refused when the graph is not the PixelCAM layout (GAP -> Gemm classifier).
    """
    src, dst = Path(src), Path(dst)
    meta = read_model_metadata(src)
    if meta.dense:
        raise ExportError(f"{src} is already format_version {meta.format_version} (dense)")
    proto = onnx.load(str(src))
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    softmax = producers.get(OUTPUT_NAMES[0])
    gemm = producers.get(softmax.input[0]) if softmax is not None and softmax.op_type == "Softmax" else None
    pool = producers.get(gemm.input[0]) if gemm is not None and gemm.op_type == "Gemm" else None
    if pool is None or pool.op_type not in ("ReduceMean", "GlobalAveragePool"):
        raise ExportError(f"{src}: class_probs is not Softmax(Gemm(global average pool(features))); only "
                          "PixelCAM's GAP + linear classifier can be upgraded (re-export from a checkpoint)")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ExportError(f"{src}: the classifier Gemm is not y = x W^T + b; re-export from a checkpoint")
    inits = {t.name: t for t in graph.initializer}
    weight = onnx.numpy_helper.to_array(inits[gemm.input[1]])  # (K, C)
    bias = onnx.numpy_helper.to_array(inits[gemm.input[2]])
    conv_w = onnx.numpy_helper.from_array(weight[:, :, None, None].astype(np.float32), "class_logits.weight")
    conv_b = onnx.numpy_helper.from_array(bias.astype(np.float32), "class_logits.bias")
    graph.initializer.extend([conv_w, conv_b])
    graph.node.append(onnx.helper.make_node("Conv", [pool.input[0], conv_w.name, conv_b.name], [DENSE_OUTPUT],
                                            name="class_logits/Conv", kernel_shape=[1, 1]))
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    for out in graph.output:
        if out.name == OUTPUT_NAMES[1]:
            out_dims = out.type.tensor_type.shape.dim
            out_dims[2].dim_param, out_dims[3].dim_param = "cells_y", "cells_x"
    graph.output.append(onnx.helper.make_tensor_value_info(
        DENSE_OUTPUT, onnx.TensorProto.FLOAT, ["batch", meta.num_classes, "cells_y", "cells_x"]))
    del graph.value_info[:]  # intermediate shapes were inferred for one input size
    doc = meta.to_dict()
    doc["format_version"] = 2
    doc["provenance"] = {**doc["provenance"], "upgraded": {
        "from_format_version": meta.format_version, "from_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "change": "class_logits output (1x1 conv with the classifier's weights) and free input height/width; "
                  "weights unchanged", "date": datetime.now(UTC).isoformat(timespec="seconds")}}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(doc, sort_keys=True, default=_json_value)
    onnx.checker.check_model(proto, full_check=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        onnx.save(proto, str(tmp))
        read_model_metadata(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


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
    source.add_argument("--upgrade", type=Path, metavar="V1.onnx",
                        help="rewrite a format_version 1 artefact as version 2 (dense), weights unchanged")
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
    if args.upgrade:
        upgrade_to_dense(args.upgrade, args.out)
        logger.info("wrote %s (format_version 2, weights of %s)", args.out, args.upgrade)
        return 0
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
