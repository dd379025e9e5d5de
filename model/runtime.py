"""The model artefact on onnxruntime: read and validate its metadata, and run tiles through one long-lived session.

Never imports torch or the network: this is what the service loads. Contract: docs/architecture.md ("The model
artefact"). Planes: tiles are `in_` pixels (S x S), outputs are `fm_` cells (S/k x S/k).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from model.config import MAX_INPUT_MPP, MIN_INPUT_MPP, is_rgb
from model.errors import InvalidModelError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "METADATA_KEY",
    "OUTPUT_NAMES",
    "DENSE_OUTPUT",
    "READ_VERSIONS",
    "ClassInfo",
    "DensePrediction",
    "InvalidModelError",
    "ModelMetadata",
    "Prediction",
    "Predictor",
    "default_providers",
    "read_model_metadata",
]

logger = logging.getLogger(__name__)

FORMAT = "pixelcam-onnx"
# Version 1: tiles (B, S, S, 3) -> class_probs (B, K), fg_prob (B, 1, S/k, S/k).
# Version 2 (dense): any (B, H, W, 3) with H, W multiples of the output stride -> the same two outputs, plus
# class_logits (B, K, H/k, W/k): each class's logit at every output cell before pooling (for a GAP + linear head,
# their mean over a window is the logit a window-sized tile would get, up to context and padding).
FORMAT_VERSION = 2  # what this pixelcam writes
READ_VERSIONS = (1, 2)  # what it reads
METADATA_KEY = "pixelcam"
INPUT_NAME = "tiles"
OUTPUT_NAMES: tuple[str, str] = ("class_probs", "fg_prob")
DENSE_OUTPUT = "class_logits"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVENANCE_FIELDS = ("dataset", "train_config_sha256", "metrics", "export_date", "weights_sha256", "software")
_FIX = "re-export it with `python -m model.export` (or training/run.py), which writes a valid artefact"
_ORT_ERRORS = (ort_state.Fail, ort_state.InvalidProtobuf, ort_state.InvalidArgument, ort_state.NoSuchFile,
               ort_state.RuntimeException, ort_state.InvalidGraph, ort_state.NotImplemented)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ClassInfo:
    """One image class: its name and display colour."""

    name: str
    color: RGB


@dataclass(frozen=True)
class ModelMetadata:
    """The validated `pixelcam` metadata document of a model artefact."""

    format_version: int
    classes: tuple[ClassInfo, ...]
    positive_class: str
    foreground_name: str
    foreground_color: RGB
    input_size: int
    input_mpp: float
    output_stride: int
    fg_threshold: float
    encoder: str
    provenance: dict[str, Any] = field(hash=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in output order."""
        return tuple(c.name for c in self.classes)

    @property
    def class_colors(self) -> tuple[RGB, ...]:
        """Class display colours in output order."""
        return tuple(c.color for c in self.classes)

    @property
    def num_classes(self) -> int:
        """Number of image classes K."""
        return len(self.classes)

    @property
    def positive_index(self) -> int:
        """Index of the positive class in `class_probs`."""
        return self.class_names.index(self.positive_class)

    @property
    def fm_size(self) -> int:
        """Side of `fg_prob` in cells: input_size // output_stride."""
        return self.input_size // self.output_stride

    @property
    def dense(self) -> bool:
        """Whether the graph takes inputs of any size and gives per-cell class logits (format version 2)."""
        return self.format_version >= 2

    def to_dict(self) -> dict[str, Any]:
        """The JSON document this metadata was parsed from (normalised)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "classes": [{"name": c.name, "color": list(c.color)} for c in self.classes],
            "positive_class": self.positive_class,
            "foreground": {"name": self.foreground_name, "color": list(self.foreground_color)},
            "input_size": self.input_size,
            "input_mpp": self.input_mpp,
            "output_stride": self.output_stride,
            "fg_threshold": self.fg_threshold,
            "encoder": self.encoder,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "model") -> ModelMetadata:
        """Validate a parsed metadata document; raise `InvalidModelError` saying what is wrong."""
        return _parse_metadata(doc, source)


@dataclass(frozen=True)
class Prediction:
    """Model outputs for a batch: class_probs (B, K) and fg_prob (B, S/k, S/k), both float32."""

    class_probs: np.ndarray
    fg_prob: np.ndarray


@dataclass(frozen=True)
class DensePrediction:
    """Dense model outputs for a batch of regions: fg_prob (B, H/k, W/k), class_logits (B, K, H/k, W/k)."""

    fg_prob: np.ndarray
    class_logits: np.ndarray


def _bad(source: str, what: str) -> InvalidModelError:
    """An InvalidModelError for `source` with the generic fix appended."""
    return InvalidModelError(f"{source}: {what}; {_FIX}")


def _field(doc: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], source: str) -> Any:
    """doc[key], checked for presence and type (bools are not numbers)."""
    if key not in doc:
        raise _bad(source, f"metadata field {key!r} is missing")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
        raise _bad(source, f"metadata field {key!r} must be {names}, got {value!r}")
    return value


def _color(value: Any, what: str, source: str) -> RGB:
    """An RGB triplet of ints in 0..255."""
    if not is_rgb(value):
        raise _bad(source, f"{what} must be an RGB triplet of three ints in 0..255, got {value!r}")
    return (value[0], value[1], value[2])


def _named_color(value: Any, what: str, source: str) -> tuple[str, RGB]:
    """A {"name": str, "color": [r, g, b]} object."""
    if not isinstance(value, Mapping):
        raise _bad(source, f"{what} must be an object with 'name' and 'color', got {value!r}")
    name = _field(value, "name", str, source)
    if not name:
        raise _bad(source, f"{what} has an empty name")
    return name, _color(value.get("color"), f"{what} colour", source)


def _parse_classes(doc: Mapping[str, Any], source: str) -> tuple[tuple[ClassInfo, ...], str]:
    """The class list and the positive class, checked against each other."""
    raw = _field(doc, "classes", list, source)
    if len(raw) < 2:
        raise _bad(source, f"metadata 'classes' needs at least two classes, got {len(raw)}")
    classes = tuple(ClassInfo(*_named_color(c, f"classes[{i}]", source)) for i, c in enumerate(raw))
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise _bad(source, f"class names must be unique, got {names}")
    positive = _field(doc, "positive_class", str, source)
    if positive not in names:
        raise _bad(source, f"positive_class {positive!r} is not one of the classes {names}")
    return classes, positive


def _parse_geometry(doc: Mapping[str, Any], source: str) -> tuple[int, float, int, float]:
    """input_size, input_mpp, output_stride and fg_threshold, each range-checked."""
    size = _field(doc, "input_size", int, source)
    stride = _field(doc, "output_stride", int, source)
    if size <= 0 or stride <= 0 or size % stride:
        raise _bad(source, f"input_size {size} must be a positive multiple of output_stride {stride}")
    mpp = float(_field(doc, "input_mpp", (int, float), source))
    if not math.isfinite(mpp) or not MIN_INPUT_MPP <= mpp <= MAX_INPUT_MPP:
        raise _bad(source, f"input_mpp {mpp} is not a plausible scale: it must be in "
                           f"[{MIN_INPUT_MPP}, {MAX_INPUT_MPP}] microns per input pixel")
    threshold = float(_field(doc, "fg_threshold", (int, float), source))
    if not 0.0 < threshold < 1.0:
        raise _bad(source, f"fg_threshold {threshold} must be strictly between 0 and 1")
    return size, mpp, stride, threshold


def _parse_metadata(doc: Any, source: str) -> ModelMetadata:
    """Validate the metadata document field by field."""
    if not isinstance(doc, Mapping):
        raise _bad(source, f"the {METADATA_KEY!r} metadata must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise _bad(source, f"metadata 'format' is {doc.get('format')!r}, expected {FORMAT!r}")
    version = _field(doc, "format_version", int, source)
    if version not in READ_VERSIONS:
        raise InvalidModelError(
            f"{source}: unknown format_version {version}; this pixelcam reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}: upgrade pixelcam to read newer models, or re-export the model"
        )
    classes, positive = _parse_classes(doc, source)
    fg_name, fg_color = _named_color(_field(doc, "foreground", dict, source), "foreground", source)
    size, mpp, stride, threshold = _parse_geometry(doc, source)
    encoder = _field(doc, "encoder", str, source)
    provenance = _field(doc, "provenance", dict, source)
    missing = [k for k in PROVENANCE_FIELDS if k not in provenance]
    if missing:
        raise _bad(source, f"metadata 'provenance' lacks {missing}")
    return ModelMetadata(version, classes, positive, fg_name, fg_color, size, mpp, stride, threshold,
                         encoder, dict(provenance))


def _dims(shape: Sequence[Any]) -> list[int | None]:
    """Static dims as ints, symbolic ones as None."""
    return [d if isinstance(d, int) else None for d in shape]


def _check_graph(session: ort.InferenceSession, meta: ModelMetadata, source: str) -> None:
    """The graph's input and outputs must match the contract and the metadata."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise _bad(source, f"the graph must have one input named {INPUT_NAME!r}, has {[i.name for i in inputs]}")
    s = meta.input_size
    side: int | None = None if meta.dense else s  # a dense graph's height and width are free
    if inputs[0].type != "tensor(uint8)" or _dims(inputs[0].shape)[1:] != [side, side, 3]:
        want = "H, W" if meta.dense else f"{s}, {s}"
        raise _bad(source, f"input {INPUT_NAME!r} must be uint8 (B, {want}, 3) RGB (NHWC) for format_version "
                           f"{meta.format_version}, got {inputs[0].type} {inputs[0].shape}")
    outputs = {o.name: o for o in session.get_outputs()}
    fm: int | None = None if meta.dense else meta.fm_size
    expected: dict[str, list[int | None]] = {"class_probs": [meta.num_classes], "fg_prob": [1, fm, fm]}
    if meta.dense:
        expected[DENSE_OUTPUT] = [meta.num_classes, None, None]
    for name, tail in expected.items():
        if name not in outputs:
            raise _bad(source, f"the graph has no output {name!r} (outputs: {sorted(outputs)})")
        out = outputs[name]
        if out.type != "tensor(float)" or len(out.shape) != len(tail) + 1 or _dims(out.shape)[1:] != tail:
            dims = ", ".join("?" if d is None else str(d) for d in tail)
            raise _bad(source, f"output {name!r} must be float32 (B, {dims}) to match the metadata (classes, "
                               f"input_size / output_stride, format_version), got {out.type} {out.shape}")
    if meta.dense:
        _probe_dense(session, meta, source)


def _probe_dense(session: ort.InferenceSession, meta: ModelMetadata, source: str) -> None:
    """A dense graph's spatial sizes are free: run one blank tile and check that the outputs have the shapes the
    metadata promises (input_size / output_stride cells, one logit map per class)."""
    blank = np.full((1, meta.input_size, meta.input_size, 3), 255, np.uint8)
    try:
        got = session.run([*OUTPUT_NAMES, DENSE_OUTPUT], {INPUT_NAME: blank})
    except _ORT_ERRORS as err:
        raise _bad(source, f"the graph fails on a {meta.input_size} px tile ({err})") from err
    fm, k = meta.fm_size, meta.num_classes
    want = {"class_probs": (1, k), "fg_prob": (1, 1, fm, fm), DENSE_OUTPUT: (1, k, fm, fm)}
    for (name, shape), value in zip(want.items(), got, strict=True):
        if tuple(value.shape) != shape:
            raise _bad(source, f"on a {meta.input_size} px tile, output {name!r} has shape {tuple(value.shape)}, "
                               f"not {shape} as the metadata (input_size / output_stride, classes) says")


def _metadata_from_session(session: ort.InferenceSession, source: str) -> ModelMetadata:
    """Parse and validate the metadata and graph signature of an open session."""
    custom = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in custom:
        raise _bad(source, f"no {METADATA_KEY!r} entry in the ONNX metadata_props: not a pixelcam model")
    try:
        doc = json.loads(custom[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise _bad(source, f"the {METADATA_KEY!r} metadata is not valid JSON ({err})") from err
    meta = _parse_metadata(doc, source)
    _check_graph(session, meta, source)
    return meta


def _read_model_bytes(path: Path) -> bytes:
    """The file's bytes, or a clear error when it is absent."""
    if not path.is_file():
        raise InvalidModelError(
            f"model file not found: {path}; give the path of a pixelcam .onnx file "
            "(`python -m model.export --random OUT.onnx` writes a random one for tests)"
        )
    return path.read_bytes()


# Where TensorProto messages sit in an ONNX ModelProto: (message, field number) -> message of that field.
_ONNX_FIELDS: dict[tuple[str, int], str] = {
    ("model", 7): "graph", ("model", 25): "function", ("function", 7): "node",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor", ("attribute", 11): "graph",
    ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A protobuf varint at pos: (value, position after it)."""
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _external_tensors(data: bytes, start: int, end: int, kind: str, depth: int = 0) -> int:
    """How many tensors under this message keep their data outside the file (protobuf wire format, walked)."""
    if depth > 64:
        raise ValueError("messages nested too deep")
    found, pos = 0, start
    while pos < end:
        key, pos = _varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == 1:
                found += 1
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise ValueError("field runs past its message")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                found += 1
            child = _ONNX_FIELDS.get((kind, field))
            if child is not None:
                found += _external_tensors(data, pos, pos + length, child, depth + 1)
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not protobuf")
    if pos != end:
        raise ValueError("field runs past its message")
    return found


def refuse_external_data(data: bytes, source: str) -> None:
    """InvalidModelError when any tensor of the model names external data: a model is one self-contained file.

    Loaded from bytes, onnxruntime would resolve such a tensor against the server's working directory, so a
    crafted model could make the server read any file it can reach.
    """
    try:
        count = _external_tensors(data, 0, len(data), "model")
    except ValueError as err:
        raise InvalidModelError(f"{source} is not a loadable ONNX model ({err}); {_FIX}") from err
    if count:
        raise InvalidModelError(
            f"{source} keeps {count} tensor(s) in external data files; a model must be one self-contained .onnx "
            "file (export with `external_data=False`, or `onnx.save_model(m, path, save_as_external_data=False)`)"
        )


def _open_session(data: bytes, source: str, options: ort.SessionOptions,
                  providers: Sequence[Any]) -> ort.InferenceSession:
    """An InferenceSession on the model bytes; ORT failures become InvalidModelError."""
    refuse_external_data(data, source)
    try:
        return ort.InferenceSession(data, sess_options=options, providers=list(providers))
    except _ORT_ERRORS as err:
        raise InvalidModelError(f"{source} is not a loadable ONNX model ({err}); {_FIX}") from err


def read_model_metadata(path: str | Path) -> ModelMetadata:
    """Validate the artefact at `path` (metadata and graph signature) and return its metadata."""
    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = _open_session(_read_model_bytes(path), str(path), options, ["CPUExecutionProvider"])
    return _metadata_from_session(session, str(path))


def _cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: those this onnxruntime build offers."""
    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available]


class Predictor:
    """One long-lived onnxruntime session on a pixelcam artefact: uint8 tiles in, probabilities out."""

    def __init__(self, path: str | Path, providers: Sequence[Any] | None = None, threads: int | None = None):
        self.path = Path(path)
        data = _read_model_bytes(self.path)
        self.sha256 = hashlib.sha256(data).hexdigest()
        if providers is None:
            providers = default_providers()
        else:
            available = set(ort.get_available_providers())
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            unknown = [n for n in names if n not in available]
            if unknown:
                raise ValueError(f"execution providers {unknown} are not in this onnxruntime build; "
                                 f"available: {sorted(available)} (or pass providers=None)")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for all {_cpu_count()} cores), got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cpu_count()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = _open_session(data, str(self.path), options, providers)
        self.metadata = _metadata_from_session(self._session, str(self.path))
        logger.info("loaded model %s (sha256 %s..., %s) on %s", self.path, self.sha256[:12],
                    self.metadata.encoder, self.providers)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, in priority order."""
        return list(self._session.get_providers())

    @property
    def threads(self) -> int:
        """Intra-op threads of the CPU execution provider."""
        return int(self._session.get_session_options().intra_op_num_threads)

    @property
    def input_size(self) -> int:
        """S: tiles are S x S RGB."""
        return self.metadata.input_size

    @property
    def fm_size(self) -> int:
        """S/k: fg_prob maps are fm_size x fm_size."""
        return self.metadata.fm_size

    def predict(self, tiles: np.ndarray) -> Prediction:
        """Run uint8 tiles (B, S, S, 3) RGB; returns class_probs (B, K) and fg_prob (B, S/k, S/k)."""
        s = self.input_size
        if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8:
            kind = tiles.dtype if isinstance(tiles, np.ndarray) else type(tiles).__name__
            raise ValueError(f"tiles must be a uint8 numpy array (B, {s}, {s}, 3), got {kind}; "
                             "convert with np.asarray(tiles, dtype=np.uint8) from 0..255 RGB")
        if tiles.ndim != 4 or tiles.shape[1:] != (s, s, 3) or tiles.shape[0] < 1:
            raise ValueError(f"tiles must have shape (B>=1, {s}, {s}, 3) RGB, got {tiles.shape}; "
                             f"resize tiles to the model's input_size {s} and stack them")
        class_probs, fg_prob = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(tiles)})
        return Prediction(np.asarray(class_probs, dtype=np.float32), np.asarray(fg_prob[:, 0], dtype=np.float32))

    def predict_dense(self, regions: np.ndarray) -> DensePrediction:
        """Run uint8 regions (B, H, W, 3) RGB of any size that is a multiple of the output stride k (a dense,
        format_version 2 model only); returns fg_prob (B, H/k, W/k) and class_logits (B, K, H/k, W/k)."""
        k = self.metadata.output_stride
        if not self.metadata.dense:
            raise ValueError(f"{self.path.name} is a format_version {self.metadata.format_version} model: it takes "
                             f"{self.input_size} px tiles only; re-export it (python -m model.export --upgrade) "
                             "for dense inference")
        if not isinstance(regions, np.ndarray) or regions.dtype != np.uint8 or regions.ndim != 4 \
                or regions.shape[3] != 3 or regions.shape[0] < 1:
            got = f"{regions.dtype} {regions.shape}" if isinstance(regions, np.ndarray) else type(regions).__name__
            raise ValueError(f"regions must be a uint8 numpy array (B>=1, H, W, 3) RGB, got {got}")
        if regions.shape[1] % k or regions.shape[2] % k:
            raise ValueError(f"region height and width must be multiples of the output stride {k}, "
                             f"got {regions.shape[1]} x {regions.shape[2]}")
        fg_prob, logits = self._session.run(["fg_prob", DENSE_OUTPUT], {INPUT_NAME: np.ascontiguousarray(regions)})
        return DensePrediction(np.asarray(fg_prob[:, 0], dtype=np.float32), np.asarray(logits, dtype=np.float32))
