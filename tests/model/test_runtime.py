"""Runtime: the Predictor on a real exported artefact, and refusal of every kind of broken artefact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from model.runtime import (
    InvalidModelError,
    ModelMetadata,
    Predictor,
    default_providers,
    read_model_metadata,
)

Doc = dict[str, Any]


def _rewrite(
    src: Path,
    dst: Path,
    meta: Callable[[Doc], None] | None = None,
    graph: Callable[[onnx.ModelProto], None] | None = None,
) -> Path:
    """Copy an artefact, editing its pixelcam JSON and/or its graph with the onnx API."""
    proto = onnx.load(str(src))
    if meta is not None:
        entry = next(p for p in proto.metadata_props if p.key == "pixelcam")
        doc = json.loads(entry.value)
        meta(doc)
        entry.value = json.dumps(doc)
    if graph is not None:
        graph(proto)
    onnx.save(proto, str(dst))
    return dst


def _rename_value(proto: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a graph input/output everywhere it appears."""
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name == old:
            value.name = new
    for node in proto.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _set(key: str, value: Any) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        doc[key] = value
    return edit


def _drop(*keys: str) -> Callable[[Doc], None]:
    def edit(doc: Doc) -> None:
        target = doc
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return edit


def _input_float(proto: onnx.ModelProto) -> None:
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _drop_metadata(proto: onnx.ModelProto) -> None:
    del proto.metadata_props[:]


def _bad_json(proto: onnx.ModelProto) -> None:
    next(p for p in proto.metadata_props if p.key == "pixelcam").value = "{classes: [benign"


META_CASES: list[tuple[str, Callable[[Doc], None], str]] = [  # on the dense (format_version 2) artefact
    ("version", _set("format_version", 3), "unknown format_version 3"),
    ("v1_on_dense_graph", _set("format_version", 1), r"uint8 \(B, 224, 224, 3\) RGB \(NHWC\) for format_version 1"),
    ("format", _set("format", "other"), "expected 'pixelcam-onnx'"),
    ("missing", _drop("encoder"), "'encoder' is missing"),
    ("missing_provenance", _drop("provenance", "weights_sha256"), "lacks \\['weights_sha256'\\]"),
    ("positive", _set("positive_class", "tumor"), "positive_class 'tumor' is not one of"),
    ("color_len", _set("foreground", {"name": "Gland", "color": [255, 140]}), "RGB triplet"),
    ("color_range", _set("classes", [{"name": "benign", "color": [0, 0, 300]},
                                     {"name": "malignant", "color": [1, 2, 3]}]), "RGB triplet"),
    ("one_class", _set("classes", [{"name": "benign", "color": [0, 0, 0]}]), "at least two classes"),
    ("divisible", _set("output_stride", 9), "multiple of output_stride 9"),
    ("mpp_zero", _set("input_mpp", 0.0), "not a plausible scale"),
    ("mpp_absurd", _set("input_mpp", 5000.0), "not a plausible scale"),
    ("mpp_type", _set("input_mpp", "1.0"), "'input_mpp' must be"),
    ("threshold_low", _set("fg_threshold", 0.0), "strictly between 0 and 1"),
    ("threshold_high", _set("fg_threshold", 1.5), "strictly between 0 and 1"),
    ("stride_vs_graph", _set("output_stride", 16), r"'fg_prob' has shape \(1, 1, 28, 28\), not \(1, 1, 14, 14\)"),
    ("classes_vs_graph", _set("classes", [{"name": n, "color": [0, 0, 0]} for n in ("a", "malignant", "c")]),
     r"'class_probs' must be float32 \(B, 3\)"),
]
V1_CASES: list[tuple[str, Callable[[Doc], None], str]] = [  # a version 1 graph fixes the tile size
    ("size_vs_graph", _set("input_size", 256), r"uint8 \(B, 256, 256, 3\)"),
    ("stride_vs_graph", _set("output_stride", 16), r"'fg_prob' must be float32 \(B, 1, 14, 14\)"),
    ("dense_claim", _set("format_version", 2), r"uint8 \(B, H, W, 3\) RGB \(NHWC\) for format_version 2"),
]


@pytest.mark.parametrize(("case", "edit", "message"), V1_CASES, ids=[c[0] for c in V1_CASES])
def test_bad_metadata_of_a_v1_artefact_is_refused(
    tmp_path: Path, resnet_onnx_v1: Path, case: str, edit: Callable[[Doc], None], message: str
) -> None:
    assert read_model_metadata(resnet_onnx_v1).format_version == 1
    path = _rewrite(resnet_onnx_v1, tmp_path / f"{case}.onnx", meta=edit)
    with pytest.raises(InvalidModelError, match=message):
        read_model_metadata(path)


@pytest.mark.parametrize(("case", "edit", "message"), META_CASES, ids=[c[0] for c in META_CASES])
def test_bad_metadata_is_refused(
    tmp_path: Path, resnet_onnx: Path, case: str, edit: Callable[[Doc], None], message: str
) -> None:
    path = _rewrite(resnet_onnx, tmp_path / f"{case}.onnx", meta=edit)
    with pytest.raises(InvalidModelError, match=message) as info:
        read_model_metadata(path)
    assert str(path) in str(info.value)
    with pytest.raises(InvalidModelError, match=message):
        Predictor(path)


GRAPH_CASES: list[tuple[str, Callable[[onnx.ModelProto], None], str]] = [
    ("no_metadata", _drop_metadata, "no 'pixelcam' entry"),
    ("bad_json", _bad_json, "not valid JSON"),
    ("input_name", lambda p: _rename_value(p, "tiles", "image"), "one input named 'tiles'"),
    ("input_dtype", _input_float, r"must be uint8 \(B, H, W, 3\)"),
    ("no_dense_output", lambda p: _rename_value(p, "class_logits", "cam"), "no output 'class_logits'"),
    ("no_fg_output", lambda p: _rename_value(p, "fg_prob", "mask"), "no output 'fg_prob'"),
    ("no_cls_output", lambda p: _rename_value(p, "class_probs", "logits"), "no output 'class_probs'"),
]


@pytest.mark.parametrize(("case", "edit", "message"), GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_bad_graph_is_refused(
    tmp_path: Path, resnet_onnx: Path, case: str, edit: Callable[[onnx.ModelProto], None], message: str
) -> None:
    path = _rewrite(resnet_onnx, tmp_path / f"{case}.onnx", graph=edit)
    with pytest.raises(InvalidModelError, match=message):
        read_model_metadata(path)


def test_missing_and_non_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="model file not found"):
        read_model_metadata(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is a slide, not a model\n" * 10)
    with pytest.raises(InvalidModelError, match="not a loadable ONNX model"):
        read_model_metadata(junk)
    with pytest.raises(InvalidModelError, match="not a loadable ONNX model"):
        Predictor(junk)


def test_metadata_from_dict_matches_file(resnet_onnx: Path) -> None:
    meta = read_model_metadata(resnet_onnx)
    assert ModelMetadata.from_dict(meta.to_dict()) == meta
    with pytest.raises(InvalidModelError, match="must be a JSON object"):
        ModelMetadata.from_dict([1, 2])


def test_predictor_properties(resnet_onnx: Path) -> None:
    predictor = Predictor(resnet_onnx, threads=1)
    assert predictor.sha256 == hashlib.sha256(resnet_onnx.read_bytes()).hexdigest()
    assert (predictor.input_size, predictor.fm_size) == (224, 28)
    assert "CPUExecutionProvider" in predictor.providers
    assert predictor.metadata == read_model_metadata(resnet_onnx)
    assert predictor.threads == 1
    assert Predictor(resnet_onnx).threads == len(os.sched_getaffinity(0))


def test_predict_batches_of_1_and_8(resnet_onnx: Path, tissue_tiles: np.ndarray) -> None:
    predictor = Predictor(resnet_onnx)
    tiles = np.concatenate([tissue_tiles, tissue_tiles[:2, ::-1]])  # 8 tiles, the last two flipped
    batch = predictor.predict(tiles)
    assert batch.class_probs.shape == (8, 2) and batch.class_probs.dtype == np.float32
    assert batch.fg_prob.shape == (8, 28, 28) and batch.fg_prob.dtype == np.float32
    np.testing.assert_allclose(batch.class_probs.sum(axis=1), 1.0, atol=1e-5)
    assert batch.fg_prob.min() >= 0.0 and batch.fg_prob.max() <= 1.0
    one = predictor.predict(tiles[3:4])
    assert one.fg_prob.shape == (1, 28, 28)
    np.testing.assert_allclose(one.class_probs[0], batch.class_probs[3], atol=1e-5)
    np.testing.assert_allclose(one.fg_prob[0], batch.fg_prob[3], atol=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t.astype(np.float32), "uint8 numpy array"),
        (lambda t: t.tolist(), "uint8 numpy array"),
        (lambda t: np.ascontiguousarray(t.transpose(0, 3, 1, 2)), r"shape \(B>=1, 224, 224, 3\)"),
        (lambda t: t[0], r"shape \(B>=1, 224, 224, 3\)"),
        (lambda t: t[:, :200, :200], r"resize tiles to the model's input_size 224"),
        (lambda t: t[:0], r"got \(0, 224, 224, 3\)"),
    ],
    ids=["float32", "list", "nchw", "no_batch_axis", "wrong_size", "empty"],
)
def test_predict_rejects_bad_tiles(
    resnet_onnx: Path, tissue_tiles: np.ndarray, make: Callable[[np.ndarray], Any], message: str
) -> None:
    predictor = Predictor(resnet_onnx, threads=1)
    with pytest.raises(ValueError, match=message):
        predictor.predict(make(tissue_tiles[:2]))


def test_predictor_refuses_bad_options(resnet_onnx: Path) -> None:
    with pytest.raises(ValueError, match="not in this onnxruntime build"):
        Predictor(resnet_onnx, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Predictor(resnet_onnx, threads=0)


def test_default_providers_end_with_cpu() -> None:
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers == [p for p in order if p in providers]


def test_runtime_imports_neither_torch_nor_onnx() -> None:
    code = "import sys, model.runtime, model.config; print(sorted({'torch', 'onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def _external(tensor: onnx.TensorProto, location: str, length: int) -> None:
    """Point a tensor's data at an outside file, as onnx's external-data format does."""
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _external_initializer(proto: onnx.ModelProto) -> None:
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    _external(init, "README.md", len(init.raw_data))


def _external_constant(proto: onnx.ModelProto) -> None:
    init = proto.graph.initializer[-1]
    value = onnx.TensorProto()
    value.CopyFrom(init)
    _external(value, "../../etc/hostname", len(init.raw_data))
    node = onnx.helper.make_node("Constant", [], [init.name + "_c"], value=value)
    proto.graph.node.insert(0, node)


@pytest.mark.parametrize("edit", [_external_initializer, _external_constant], ids=["initializer", "constant"])
def test_external_data_is_refused_at_upload_and_at_load(tmp_path: Path, resnet_onnx: Path,
                                                        edit: Callable[[onnx.ModelProto], None]) -> None:
    # the named file exists in the working directory: loaded from bytes, onnxruntime would read it
    (tmp_path / "README.md").write_bytes(os.urandom(1 << 22))
    path = _rewrite(resnet_onnx, tmp_path / "external.onnx", graph=edit)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(InvalidModelError, match="external data"):
            read_model_metadata(path)
        with pytest.raises(InvalidModelError, match="external data"):
            Predictor(path)
    finally:
        os.chdir(cwd)
