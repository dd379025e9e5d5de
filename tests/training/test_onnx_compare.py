"""onnx_compare: the onnxruntime whole-image evaluation is the evaluate stage's, and the speed blocks alternate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.export import calibrate_batchnorm, export_onnx
from model.network import build_model
from model.runtime import Predictor
from training.data import load_glas, load_samples
from training.evaluate import evaluate_split
from training.export_stage import real_tiles
from training.onnx_compare import evaluate_onnx, output_diffs, speed, whole_image_session

NAMES = ["testA_1", "testA_2", "testB_3", "train_2"]  # masked, both classes, two image sizes


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory: pytest.TempPathFactory, glas_dir: Path):
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder_name="resnet18", encoder_width=0.125, output_stride=8, input_size=64, input_mpp=2.5
    )
    model = build_model(cfg)
    samples = load_samples(load_glas(glas_dir), NAMES, scale=0.62005 / cfg.input_mpp)
    calibrate_batchnorm(model, real_tiles(samples, 64, 8))
    path = export_onnx(model, cfg, tmp_path_factory.mktemp("cmp") / "tiny.onnx", fg_threshold=0.5)
    return model, path, samples


def test_onnx_whole_image_evaluation_matches_the_torch_one(model_and_onnx) -> None:
    model, path, samples = model_and_onnx
    assert {s.image.shape for s in samples} != {samples[0].image.shape}  # not one size: the axes must be free
    ref = evaluate_split(model, samples, mode="pixel")
    got = evaluate_onnx(whole_image_session(path, threads=1), samples, stride=8)
    assert got.accuracy == ref.accuracy and got.n_masked == ref.n_masked == len(samples)
    assert got.counts.pos_hist.sum() == ref.counts.pos_hist.sum()
    # float differences only move a few pixels across the 1,000 histogram bins
    assert np.abs(got.counts.pos_hist - ref.counts.pos_hist).sum() < 1e-3 * ref.counts.pos_hist.sum()
    assert got.counts.pxap() == pytest.approx(ref.counts.pxap(), abs=0.01)


def test_diffs_and_speed_blocks(model_and_onnx) -> None:
    _, path, samples = model_and_onnx
    tiles = real_tiles(samples, 64, 8)
    a, b = Predictor(path, threads=1), Predictor(path, threads=1)
    diffs = output_diffs(a, b, tiles)
    assert diffs["tiles"] == 8 and diffs["fg_prob_max"] == 0.0 and diffs["class_agreement"] == 1.0
    report = speed({"a": a, "b": b}, [tiles, tiles], rounds=2)
    assert set(report) == {"a", "b"}
    for row in report.values():
        assert row["blocks"] == 2 and row["tiles_per_block"] == 16
        assert row["tiles_per_s"] > 0 and row["cpu_s_per_tile"] > 0
        assert row["tiles_per_s_range"][0] <= row["tiles_per_s"] <= row["tiles_per_s_range"][1]
