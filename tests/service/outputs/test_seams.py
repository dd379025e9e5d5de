"""The seam score: synthetic maps with and without a grid, and the demo model's heatmaps of a real slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from model.runtime import Predictor
from service.analysis.pipeline import analyze_slide
from service.analysis.plan import AnalysisOptions
from service.outputs.seams import seam_score
from service.outputs.stitching import decode_heatmap

DEMO_MODEL = Path(__file__).resolve().parents[3] / "model" / "weights" / "pixelcam-glas-resnet18.onnx"


def _smooth(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // 16 + 2, shape[1] // 16 + 2))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, shape[0]), np.linspace(0, coarse.shape[1] - 1.001, shape[1])
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c = coarse
    return ((1 - fy) * (1 - fx) * c[y0][:, x0] + fy * (1 - fx) * c[y0 + 1][:, x0]
            + (1 - fy) * fx * c[y0][:, x0 + 1] + fy * fx * c[y0 + 1][:, x0 + 1])


def test_a_map_with_steps_every_k_cells_scores_high_at_that_period() -> None:
    base = _smooth((224, 224))
    blocks = np.kron(np.random.default_rng(1).random((8, 8)), np.ones((28, 28)))  # a tile per 28 cells
    tiled = 0.5 * base + 0.5 * blocks
    assert seam_score(tiled, 28).score > 3.0
    assert seam_score(base, 28).score < 1.5  # smooth: no phase stands out
    only_x = 0.5 * base + 0.5 * np.kron(np.ones((1, 8)), np.ones((224, 28))) * np.arange(224)[None, :] // 28 / 8
    result = seam_score(only_x, 28)
    assert result.x > 3.0 and result.y < 1.5


def test_unanalysed_cells_are_ignored_and_bad_input_is_refused() -> None:
    base = _smooth((112, 112))
    holes = base.copy()
    holes[:, 56:84] = np.nan  # a column of tiles not analysed: no step is counted across its borders
    assert seam_score(holes, 28).score == pytest.approx(seam_score(base, 28).score, rel=0.5)
    assert np.isnan(seam_score(np.full((50, 50), np.nan), 28).score)
    with pytest.raises(ValueError, match="2-D"):
        seam_score(np.zeros(10), 28)
    with pytest.raises(ValueError, match="period"):
        seam_score(base, 1)


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not in this checkout")
def test_dense_default_removes_the_tile_grid_on_a_real_slide(cmu_small_path: Path, tmp_path: Path) -> None:
    predictor = Predictor(DEMO_MODEL, threads=2)
    scores = {}
    for mode in ("tiles", "auto"):
        result = analyze_slide(cmu_small_path, predictor, tmp_path / mode, AnalysisOptions(inference=mode))
        prob, covered = decode_heatmap(tifffile.imread(result.path("heatmap"), key=0))
        period = round(result.result["provenance"]["parameters"]["l0_tile_size"] / result.result["heatmap"]["hm_downsample"])
        assert period == predictor.fm_size
        scores[mode] = seam_score(np.where(covered, prob, np.nan), period).score
    assert scores["tiles"] > 2.0, scores  # tile by tile, every tile border is a step
    assert scores["auto"] <= 1.4, scores  # dense: the bound for a seam-free map
