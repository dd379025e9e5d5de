"""The slide-path evaluation: GlaS images written as slides, analysed by the service core, scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.runtime import Predictor
from service.slide.wsi import open_slide
from training.config import GLAS_MPP
from training.data import load_glas, read_rgb
from training.metrics import PixelCounts
from training.slide_eval import evaluate_as_slides, heatmap_at_pixels, main, write_slide

DEMO_MODEL = Path(__file__).resolve().parents[2] / "model" / "weights" / "pixelcam-glas-lite0-s5.onnx"


def test_a_written_slide_reads_back_with_its_size_and_mpp(glas_dir: Path, tmp_path: Path) -> None:
    image = read_rgb(glas_dir / "images" / "testA_1.png")
    path = write_slide(image, tmp_path / "testA_1.tif", GLAS_MPP)
    with open_slide(path) as slide:
        assert slide.info.l0_size_wh == (image.shape[1], image.shape[0])
        assert slide.info.mpp == pytest.approx(GLAS_MPP, rel=1e-6) and slide.info.mpp_source in ("openslide.mpp-x", "tiff.XResolution")  # from the tags
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (64, 48)), image[:48, :64])  # lossless


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not in this checkout")
def test_slide_path_scores_equal_the_metrics_on_the_decoded_heatmaps(glas_dir: Path, tmp_path: Path) -> None:
    records = [r for r in load_glas(glas_dir) if r.name in ("testA_1", "testA_3", "testB_1")]
    predictor = Predictor(DEMO_MODEL, threads=2)
    result = evaluate_as_slides(predictor, records, tmp_path, progress=False)
    assert len(result.rows) == 3 and 0 <= result.accuracy <= 100
    assert all(row["mpp_read"] == pytest.approx(GLAS_MPP) for row in result.rows)
    counts = PixelCounts.empty()
    for record in records:  # the same score computed here from the files the analyses left
        image = read_rgb(record.image_path)
        doc = json.loads((tmp_path / "out" / record.name / "result.json").read_text())
        prob, covered = heatmap_at_pixels(tmp_path / "out" / record.name / "heatmap.tif",
                                          (image.shape[1], image.shape[0]), doc["heatmap"]["hm_downsample"])
        counts.add(np.where(covered, prob, 0.0), read_rgb(record.mask_path)[..., 0] > 127)
    assert result.pxap == pytest.approx(counts.pxap())
    labels = {r.name: ("benign", "malignant")[r.label] for r in records}
    expected = 100 * np.mean([row["predicted"] == labels[row["name"]] for row in result.rows])
    assert result.accuracy == pytest.approx(expected)


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not in this checkout")
def test_cli_writes_a_report(data_dir: Path, tmp_path: Path) -> None:
    assert main([str(DEMO_MODEL), "--limit", "2", "--out", str(tmp_path), "--threads", "2",
                 "--data-dir", str(data_dir)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 2 and report["split"] == "test" and len(report["images"]) == 2
    assert not (tmp_path / "work").exists()  # the slides are temporary unless --keep


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not in this checkout")
def test_cli_scores_a_runs_validation_split_and_needs_its_splits(data_dir: Path, tmp_path: Path) -> None:
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["train_1"], "valcl": ["train_20", "train_16"], "valpx": ["train_20"],
                                  "test": []}))
    assert main([str(DEMO_MODEL), "--split", "valcl", "--splits", str(splits), "--out", str(tmp_path / "out"),
                 "--threads", "2", "--data-dir", str(data_dir)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["split"] == "valcl" and sorted(r["name"] for r in report["images"]) == ["train_16", "train_20"]
    with pytest.raises(SystemExit, match="needs --splits"):
        main([str(DEMO_MODEL), "--split", "valpx", "--out", str(tmp_path / "o2"), "--data-dir", str(data_dir)])
