"""The slide call, its evidence counts and the provenance helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from service.outputs.geojson import Region
from service.outputs.report import (
    EvidenceCounter,
    region_summaries,
    slide_call,
    software_versions,
    top_k_for,
    write_result,
)
from service.outputs.stitching import HeatmapBand, HeatmapGrid

NAMES = ("benign", "malignant")


def _probs(positive: list[float]) -> np.ndarray:
    p = np.asarray(positive, np.float64)
    return np.stack([1 - p, p], axis=1)


def test_top_k_grows_with_the_slide_and_is_capped() -> None:
    assert [top_k_for(n) for n in (1, 9, 10, 11, 100, 5000)] == [1, 1, 1, 2, 10, 32]


def test_a_small_positive_focus_makes_the_slide_positive() -> None:
    # 3 of 30 tiles are strongly positive: the plain mean (0.17) would miss them, the top-3 mean does not
    call = slide_call(_probs([0.9] * 3 + [0.1] * 27), NAMES, positive_index=1)
    assert call.k == 3 and call.tiles == 30
    assert call.label == "malignant"
    assert call.positive_probability == pytest.approx(0.9)
    assert call.probability == pytest.approx(0.9)
    assert call.class_means["malignant"] == pytest.approx(0.18)


def test_one_outlier_tile_does_not_flip_a_large_slide() -> None:
    call = slide_call(_probs([0.99] + [0.1] * 99), NAMES, positive_index=1)
    assert call.k == 10
    assert call.label == "benign"
    assert call.positive_probability == pytest.approx((0.99 + 9 * 0.1) / 10)
    assert call.probability == pytest.approx(1 - call.positive_probability)


def test_negative_call_picks_the_likeliest_other_class_by_tissue_weighted_mean() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    names = ("normal", "inflamed", "tumour")
    assert slide_call(probs, names, 2, tissue_fraction=np.array([1.0, 0.1])).label == "normal"
    assert slide_call(probs, names, 2, tissue_fraction=np.array([0.1, 1.0])).label == "inflamed"
    block = slide_call(probs, names, 2).to_dict()
    assert block["aggregation"]["method"] == "top_k_mean" and "top-k" in block["aggregation"]["why"]


def test_no_tiles_is_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="no tissue"):
        slide_call(np.zeros((0, 2)), NAMES, 1)


def test_evidence_counts_cells_against_the_tissue_mask() -> None:
    grid = HeatmapGrid(l0_size_wh=(40, 40), hm_downsample=10.0)  # 4 x 4 cells of 5 um at 0.5 mpp
    prob = np.array([[0.9, 0.9, 0.1, 0.0]] * 4, np.float32)
    covered = np.ones((4, 4), bool)
    covered[:, 3] = False
    tissue = np.zeros((2, 2), bool)  # one mask pixel = 20 l0 px = 2 x 2 cells
    tissue[:, 0] = True  # the left half is tissue
    counter = EvidenceCounter(grid, 0.5, tissue, tissue_l0_per_px=20.0)
    for y in (0, 2):
        band = HeatmapBand(y, prob[y : y + 2], covered[y : y + 2])
        assert counter.add(band) is band
    assert (counter.analysed, counter.positive, counter.tissue, counter.positive_on_tissue) == (12, 8, 8, 8)
    evidence = counter.to_dict(l0_mpp=0.5)
    cell_mm2 = (5.0 / 1000) ** 2
    assert evidence["positive_area_mm2"] == pytest.approx(round(8 * cell_mm2, 4))
    assert evidence["tissue_area_mm2"] == pytest.approx(round(2 * (10.0 / 1000) ** 2, 4))
    assert evidence["positive_fraction_of_tissue"] == 1.0
    assert evidence["positive_fraction_of_analysed"] == pytest.approx(round(8 / 12, 4))


def test_region_summaries_are_level0_boxes_largest_first() -> None:
    small = Region(shapely.box(0, 0, 1, 1), cells=1, mean_prob=0.9, max_prob=0.9)
    big = Region(shapely.box(2, 3, 5, 5), cells=6, mean_prob=0.7, max_prob=0.8)
    out = region_summaries([small, big], hm_downsample=10.0, l0_mpp=0.5, l0_offset_xy=(5.0, 0.0), top_k=1)
    assert out == [
        {
            "l0_box_xywh": [15.0, 30.0, 30.0, 20.0],
            "area_um2": 150.0,
            "mean_probability": 0.7,
            "max_probability": 0.8,
        }
    ]


def test_software_versions_and_atomic_result(tmp_path: Path) -> None:
    versions = software_versions()
    assert versions["python"].count(".") == 2
    assert versions["numpy"] == np.__version__
    path = write_result(tmp_path / "result.json", {"versions": versions})
    assert json.loads(path.read_text())["versions"] == versions
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_tiles_thin_on_tissue_can_be_left_out_of_the_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.outputs.report as report

    probs = np.array([[0.9, 0.1]] * 18 + [[0.05, 0.95]] * 2)  # two glass-edge tiles say positive
    tissue = np.array([0.9] * 18 + [0.15] * 2)
    monkeypatch.setattr(report, "TOP_K_MIN_TISSUE", 0.0)  # every tile counts: the two glass-edge tiles decide
    assert report.slide_call(probs, ["benign", "malignant"], 1, tissue).label == "malignant"
    monkeypatch.setattr(report, "TOP_K_MIN_TISSUE", 0.5)  # the default
    call = report.slide_call(probs, ["benign", "malignant"], 1, tissue)
    assert call.label == "benign" and call.positive_probability == pytest.approx(0.1)
    few = report.slide_call(probs[-2:], ["benign", "malignant"], 1, tissue[-2:])  # none rich: every tile counts
    assert few.label == "malignant"
