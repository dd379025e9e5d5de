"""ONNX export: checker, onnxruntime-vs-torch parity on real tissue tiles, metadata and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig, config_sha256
from model.errors import ExportError, ParityError
from model.export import check_parity, export_onnx, main, weights_sha256
from model.network import PixelCAM
from model.runtime import Predictor, read_model_metadata
from tests.model.conftest import small_model


def test_resnet_export_checks_and_matches_torch(
    resnet_onnx: Path, resnet_model: PixelCAM, tissue_tiles: np.ndarray
) -> None:
    proto = onnx.load(str(resnet_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    diffs = check_parity(resnet_model, resnet_onnx, tissue_tiles, atol=1e-4)
    # a ResNet artefact is format_version 2: the dense outputs are checked on a 2 x 2-tile region too
    assert set(diffs) == {"class_probs", "fg_prob", "dense_fg_prob", "class_logits"}
    assert max(diffs.values()) <= 1e-4
    # The tiles differ, so a faithful model gives different maps: the comparison is not between constants.
    fg = Predictor(resnet_onnx).predict(tissue_tiles).fg_prob
    assert fg.std(axis=(1, 2)).min() > 1e-3
    assert np.abs(fg[0] - fg[1]).max() > 1e-3


def test_vit_export_matches_torch(tmp_path: Path, tissue_tiles: np.ndarray) -> None:
    cfg = ModelConfig(encoder_name="vit_tiny", output_stride=16, encoder_width=0.25)
    model = small_model(cfg, tissue_tiles)
    path = export_onnx(model, cfg, tmp_path / "vit.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    check_parity(model, path, tissue_tiles[:3], atol=1e-4)
    pred = Predictor(path).predict(tissue_tiles[:2])
    assert pred.fg_prob.shape == (2, 14, 14)
    assert not read_model_metadata(path).dense  # the ViT takes 224 px only: a format_version 1 artefact


def test_dense_outputs_pool_to_the_tile_classifier_and_take_any_size(
    resnet_onnx: Path, tissue_tiles: np.ndarray
) -> None:
    predictor = Predictor(resnet_onnx, threads=2)
    assert predictor.metadata.dense and predictor.metadata.format_version == 2
    tiles = predictor.predict(tissue_tiles[:3])
    dense = predictor.predict_dense(tissue_tiles[:3])
    np.testing.assert_allclose(dense.fg_prob, tiles.fg_prob, atol=1e-5)
    pooled = dense.class_logits.mean(axis=(2, 3))
    probs = np.exp(pooled) / np.exp(pooled).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, tiles.class_probs, atol=1e-5)  # GAP + linear = mean of the logit map
    region = np.ascontiguousarray(np.concatenate([tissue_tiles[0], tissue_tiles[1][:, :96]], axis=1)[None])
    out = predictor.predict_dense(region)  # 224 x 320: any multiple of the output stride
    assert out.fg_prob.shape == (1, 28, 40) and out.class_logits.shape == (1, 2, 28, 40)
    with pytest.raises(ValueError, match="multiples of the output stride"):
        predictor.predict_dense(np.zeros((1, 224, 230, 3), np.uint8))


def test_a_v1_artefact_is_upgraded_to_dense_with_its_weights(tmp_path: Path, tissue_tiles: np.ndarray) -> None:
    cfg = ModelConfig(encoder_name="resnet18", encoder_width=0.25, output_stride=8)
    model = small_model(cfg, tissue_tiles)
    v1 = tmp_path / "v1.onnx"
    export_onnx(model, cfg, v1, dense=False)  # as older pixelcam wrote them
    old = Predictor(v1)
    assert not old.metadata.dense
    with pytest.raises(ValueError, match="format_version 1"):
        old.predict_dense(tissue_tiles[:1])
    v2 = tmp_path / "v2.onnx"
    assert main(["--upgrade", str(v1), str(v2)]) == 0
    new = Predictor(v2)
    assert new.metadata.dense and new.metadata.provenance["upgraded"]["from_format_version"] == 1
    assert new.metadata.provenance["weights_sha256"] == old.metadata.provenance["weights_sha256"]
    a, b = old.predict(tissue_tiles[:2]), new.predict(tissue_tiles[:2])
    np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-6)
    np.testing.assert_allclose(a.fg_prob, b.fg_prob, atol=1e-6)
    with pytest.raises(ExportError, match="already"):
        main(["--upgrade", str(v2), str(tmp_path / "v3.onnx")])


def test_metadata_round_trip(resnet_onnx: Path, resnet_cfg: ModelConfig, resnet_model: PixelCAM) -> None:
    meta = read_model_metadata(resnet_onnx)
    assert meta.class_names == resnet_cfg.class_names
    assert meta.class_colors == resnet_cfg.class_colors
    assert meta.positive_class == "malignant" and meta.positive_index == 1
    assert (meta.foreground_name, meta.foreground_color) == (resnet_cfg.foreground_name, resnet_cfg.foreground_color)
    assert (meta.input_size, meta.output_stride, meta.fm_size) == (224, 8, 28)
    assert meta.input_mpp == pytest.approx(0.5)
    assert meta.fg_threshold == pytest.approx(0.4)
    assert meta.encoder == "resnet18"
    prov = meta.provenance
    assert prov["dataset"] == "glas-test" and prov["metrics"] == {"pxap": 12.5}
    assert prov["weights_sha256"] == weights_sha256(resnet_model)
    assert prov["software"]["torch"] == torch.__version__
    stored = json.loads(next(p.value for p in onnx.load(str(resnet_onnx)).metadata_props if p.key == "pixelcam"))
    assert meta.to_dict() == stored


def test_export_refuses_inconsistent_requests(tmp_path: Path, resnet_model: PixelCAM, resnet_cfg: ModelConfig) -> None:
    with pytest.raises(ExportError, match="fg_threshold"):
        export_onnx(resnet_model, resnet_cfg, tmp_path / "a.onnx", fg_threshold=1.0)
    with pytest.raises(ExportError, match="output_stride"):
        export_onnx(resnet_model, resnet_cfg.replace(output_stride=16), tmp_path / "b.onnx")
    assert not list(tmp_path.iterdir())


def test_parity_detects_a_different_model(
    tmp_path: Path, resnet_cfg: ModelConfig, tissue_tiles: np.ndarray, resnet_onnx: Path
) -> None:
    other = small_model(resnet_cfg, tissue_tiles, seed=1)
    with pytest.raises(ParityError, match="differ"):
        check_parity(other, resnet_onnx, tissue_tiles[:2], atol=1e-4)


def test_cli_random_and_checkpoint(tmp_path: Path, resnet_cfg: ModelConfig, tissue_tiles: np.ndarray) -> None:
    out = tmp_path / "random.onnx"
    assert main(["--random", str(out), "--width", "0.25", "--output-stride", "16", "--input-mpp", "2.0"]) == 0
    meta = read_model_metadata(out)
    assert (meta.output_stride, meta.input_mpp, meta.fm_size) == (16, 2.0, 14)
    probs = Predictor(out).predict(tissue_tiles).class_probs
    assert probs.max() < 0.9999  # BN calibrated: a random model is not saturated

    model = small_model(resnet_cfg, tissue_tiles)
    train_config = {"dataset": "glas", "lr": 1e-3}
    ckpt = save_checkpoint(tmp_path / "m.pt", model, resnet_cfg, train_config=train_config,
                           extra={"metrics": {"pxap": 60.0}})
    out_np = export_onnx(model, resnet_cfg, tmp_path / "np.onnx",
                         provenance={"metrics": {"acc": np.float32(0.5), "curve": np.arange(2)}, "run": tmp_path})
    prov = read_model_metadata(out_np).provenance
    assert prov["metrics"] == {"acc": 0.5, "curve": [0, 1]} and prov["run"] == str(tmp_path)
    out2 = tmp_path / "trained.onnx"
    assert main(["--checkpoint", str(ckpt), str(out2), "--fg-threshold", "0.3"]) == 0
    meta2 = read_model_metadata(out2)
    assert meta2.fg_threshold == pytest.approx(0.3)
    assert meta2.provenance["dataset"] == "glas"
    assert meta2.provenance["metrics"] == {"pxap": 60.0}
    assert meta2.provenance["train_config_sha256"] == config_sha256(train_config)
    check_parity(model, out2, tissue_tiles[:2], atol=1e-4)


def test_a_smoothing_pixel_head_averages_its_logits_and_exports_with_parity(
    tmp_path: Path, tissue_tiles: np.ndarray
) -> None:
    cfg = ModelConfig(encoder_name="resnet18", encoder_width=0.25, output_stride=8, pixel_smooth=5)
    model = small_model(cfg, tissue_tiles).eval()
    x = torch.randn(1, model.encoder.out_channels, 12, 16)
    raw = model.pixel_head.conv(x)
    out = model.pixel_head(x)
    # an inner cell is the plain 5 x 5 mean; a corner one the mean of the 3 x 3 cells that exist
    torch.testing.assert_close(out[0, :, 5, 7], raw[0, :, 3:8, 5:10].mean(dim=(1, 2)))
    torch.testing.assert_close(out[0, :, 0, 0], raw[0, :, :3, :3].mean(dim=(1, 2)))
    path = export_onnx(model, cfg, tmp_path / "smooth.onnx")
    diffs = check_parity(model, path, tissue_tiles[:3], atol=1e-4)
    assert max(diffs.values()) <= 1e-4 and "dense_fg_prob" in diffs
    with pytest.raises(ValueError, match="pixel_smooth must be an odd integer"):
        ModelConfig(pixel_smooth=4)
