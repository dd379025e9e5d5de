"""Static int8 (QDQ) quantisation of a pixelcam ONNX artefact for CPU inference, calibrated on real tissue.

The graph keeps its contract: input `tiles` uint8 (B, S, S, 3), float32 outputs `class_probs` and `fg_prob`
(Softmax and the normalisation stay float). Weights are int8 per output channel, activations uint8 per tensor
(MinMax ranges over the calibration tiles). `reduce_range` (7-bit weights) is on by default: CPUs without VNNI
(AVX2 only) compute u8 x s8 products with a saturating 16-bit instruction, and 7-bit weights avoid that overflow.
The metadata document is copied unchanged except for `provenance["quantization"]`, which says how the file
was made. Needs onnx and onnxruntime, never torch. See model/README.md ("int8") for measured speed and accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from model.errors import ExportError, InvalidModelError
from model.runtime import INPUT_NAME, METADATA_KEY, read_model_metadata

__all__ = ["QUANTIZED_OPS", "calibration_tiles", "main", "quantize_model"]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "Gemm", "Add", "Relu", "MaxPool", "ReduceMean")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WHITE = 255


class _Tiles(CalibrationDataReader):
    """Feeds the calibration tiles to onnxruntime's calibrator in batches."""

    def __init__(self, tiles: np.ndarray, batch: int = 8):
        self._batches = [np.ascontiguousarray(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
        self._it: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ExportError(f"cannot read calibration image {path}: is it a valid PNG/JPEG/TIFF?")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def calibration_tiles(
    paths: Sequence[Path], *, scale: float, size: int, per_image: int = 2, seed: int = 0
) -> np.ndarray:
    """`per_image` random size x size crops of each image after resampling by `scale` (source mpp / input mpp).

    Images smaller than a tile are padded with white, as in training. Returns uint8 (N, size, size, 3).
    """
    if not paths:
        raise ExportError("no calibration images: give real tissue images at a known scale (--source-mpp)")
    if not scale > 0:
        raise ExportError(f"the resampling factor must be positive, got {scale}")
    rng = np.random.default_rng(seed)
    tiles = []
    for path in paths:
        image = _read_rgb(path)
        h, w = image.shape[:2]
        if scale != 1:
            wh = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, wh, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            h, w = image.shape[:2]
        if h < size or w < size:
            image = np.pad(
                image, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), constant_values=WHITE
            )
            h, w = image.shape[:2]
        for _ in range(per_image):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            tiles.append(image[top : top + size, left : left + size])
    return np.ascontiguousarray(np.stack(tiles))


def _signature(model: onnx.ModelProto) -> list[tuple[str, int, tuple[int | None, ...]]]:
    """Names, element types and static dims (None: symbolic) of the graph's inputs and outputs."""
    def dims(v: onnx.ValueInfoProto) -> tuple[int | None, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)

    return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in (*model.graph.input, *model.graph.output)]


def quantize_model(
    src: str | Path,
    dst: str | Path,
    tiles: np.ndarray,
    *,
    calibration: Mapping[str, Any],
    per_channel: bool = True,
    reduce_range: bool = True,
    exclude_nodes: Sequence[str] = (),
) -> Path:
    """Write the int8 QDQ version of the artefact `src` to `dst`, calibrated on uint8 `tiles` (N, S, S, 3).

    `calibration` describes where the tiles came from; it is stored in the metadata with the settings.
    """
    src, dst = Path(src), Path(dst)
    meta = read_model_metadata(src)  # refuse a non-pixelcam input up front
    s = meta.input_size
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (s, s, 3) or len(tiles) < 1:
        raise ExportError(
            f"calibration tiles must be uint8 (N>=1, {s}, {s}, 3), got {tiles.dtype} {tiles.shape}"
        )
    source = onnx.load(str(src))
    doc = json.loads(next(p.value for p in source.metadata_props if p.key == METADATA_KEY))
    if "quantization" in doc["provenance"]:
        raise ExportError(f"{src} is already quantised ({doc['provenance']['quantization'].get('format')})")
    doc["provenance"]["quantization"] = {
        "format": "onnxruntime static QDQ",
        "weights": f"int8, symmetric, per {'channel' if per_channel else 'tensor'}"
        + (", reduce_range (7-bit)" if reduce_range else ""),
        "activations": "uint8, asymmetric, per tensor, MinMax over the calibration tiles",
        "quantized_ops": list(QUANTIZED_OPS),
        "excluded_nodes": list(exclude_nodes),
        "calibration": dict(calibration, tiles=len(tiles)),
        "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "onnxruntime": onnxruntime.__version__,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as work:
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(src), str(pre))  # shape inference + graph optimisation (BN already folded)
            quantize_static(
                str(pre),
                str(tmp),
                _Tiles(tiles),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude_nodes),
                calibrate_method=CalibrationMethod.MinMax,
            )
        proto = onnx.load(str(tmp))
        if _signature(proto) != _signature(source):
            raise ExportError(f"quantisation changed the graph's inputs/outputs: {_signature(proto)}")
        for mine, theirs in zip((*proto.graph.input, *proto.graph.output),
                                (*source.graph.input, *source.graph.output), strict=True):
            mine.type.CopyFrom(theirs.type)  # the source's own names for the symbolic dims
        del proto.metadata_props[:]
        for prop in source.metadata_props:  # the source's properties, only the pixelcam document amended
            entry = proto.metadata_props.add()
            entry.key = prop.key
            entry.value = json.dumps(doc, sort_keys=True) if prop.key == METADATA_KEY else prop.value
        proto.producer_name = "pixelcam"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        read_model_metadata(tmp)  # the service's own gate
        os.replace(tmp, dst)
    except (onnx.checker.ValidationError, InvalidModelError, RuntimeError) as err:
        raise ExportError(f"int8 quantisation of {src} to {dst} failed: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%d bytes, int8 QDQ, %d calibration tiles)", dst, dst.stat().st_size, len(tiles))
    return dst


def _images(folder: Path, pattern: str) -> list[Path]:
    paths = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ExportError(f"no images matching {pattern!r} in {folder}")
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="the fp32 pixelcam .onnx")
    parser.add_argument("out", type=Path, help="path of the int8 .onnx to write")
    parser.add_argument(
        "--calibration-dir",
        type=Path,
        required=True,
        help="folder of real tissue images (never the test split)",
    )
    parser.add_argument("--pattern", default="*", help="glob of the calibration images in that folder")
    parser.add_argument(
        "--source-mpp",
        type=float,
        required=True,
        help="microns per pixel of the calibration images (resampled to the model's input_mpp)",
    )
    parser.add_argument("--per-image", type=int, default=2, help="random crops per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop positions")
    parser.add_argument(
        "--per-tensor", action="store_true", help="per-tensor weight scales (default: per channel)"
    )
    parser.add_argument(
        "--full-range",
        action="store_true",
        help="8-bit weights (default 7-bit: avoids u8s8 saturation on AVX2 CPUs without VNNI)",
    )
    parser.add_argument("--exclude", nargs="*", default=[], help="node names to leave in float32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: quantise an artefact, calibrated on random crops of the images in a folder."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    meta = read_model_metadata(args.src)
    paths = _images(args.calibration_dir, args.pattern)
    scale = args.source_mpp / meta.input_mpp
    tiles = calibration_tiles(
        paths, scale=scale, size=meta.input_size, per_image=args.per_image, seed=args.seed
    )
    names = "\n".join(p.name for p in paths).encode()
    calibration = {
        "images": len(paths),
        "pattern": args.pattern,
        "image_names_sha256": hashlib.sha256(names).hexdigest(),
        "source_mpp": args.source_mpp,
        "tile_selection": f"{args.per_image} random {meta.input_size} px crops per image after resampling "
        f"to {meta.input_mpp} um/px, seed {args.seed}",
    }
    quantize_model(
        args.src,
        args.out,
        tiles,
        calibration=calibration,
        per_channel=not args.per_tensor,
        reduce_range=not args.full_range,
        exclude_nodes=args.exclude,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
