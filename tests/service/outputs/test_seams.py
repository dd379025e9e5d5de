"""The seam score: synthetic maps with and without a grid, and the demo model's heatmaps of a real slide."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from model.runtime import Predictor
from service.analysis.pipeline import analyze_slide
from service.analysis.plan import AnalysisOptions
from service.outputs.seams import seam_score
from service.outputs.stitching import decode_heatmap
from service.slide.wsi import open_slide

WEIGHTS = Path(__file__).resolve().parents[3] / "model" / "weights"
# the shipped default (EfficientNet-Lite0 trunk) and the older from-scratch ResNet-18 demo
SHIPPED = [WEIGHTS / "pixelcam-glas-lite0-s5.onnx", WEIGHTS / "pixelcam-glas-resnet18.onnx"]


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


def _single_pass(slide_path: Path, predictor: Predictor) -> np.ndarray:
    """The model's fg map of the whole slide in one input (no tiles, no regions): the seam-free reference."""
    with open_slide(slide_path) as slide:
        w, h = slide.info.l0_size_wh
        image = np.ascontiguousarray(slide.read_region((0, 0), 0, (w, h))[..., :3])
        scale = slide.info.mpp / predictor.metadata.input_mpp
    image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    k = predictor.metadata.output_stride
    pad = np.pad(image, ((0, -image.shape[0] % k), (0, -image.shape[1] % k), (0, 0)), constant_values=255)
    return predictor.predict_dense(pad[None]).fg_prob[0]


@pytest.mark.parametrize("model_path", SHIPPED, ids=lambda p: p.stem)
def test_dense_default_removes_the_tile_grid_on_a_real_slide(cmu_small_path: Path, tmp_path: Path,
                                                             model_path: Path) -> None:
    """Dense maps score like the model's own single-pass map of the slide on the same cells; tiles far worse.

    A sharp model's map of a small slide has content steps that the fold does not average away: for the shipped
    Lite0 model the single pass over CMU-1-Small-Region scores about 1.7 with no tiling at all, so the bound is
    relative to that reference (and 1.4 where the reference is lower). The heatmaps are compared as the model
    gives them (`tissue_only` off), since the reference has no tissue mask.
    """
    if not model_path.is_file():
        pytest.skip(f"{model_path.name} is not in this checkout")
    predictor = Predictor(model_path, threads=2)
    reference = _single_pass(cmu_small_path, predictor)
    scores: dict[str, float] = {}
    refs: dict[str, float] = {}
    for mode in ("tiles", "auto"):
        result = analyze_slide(cmu_small_path, predictor, tmp_path / mode,
                               AnalysisOptions(inference=mode, tissue_only=False))
        prob, covered = decode_heatmap(tifffile.imread(result.path("heatmap"), key=0))
        period = round(result.result["provenance"]["parameters"]["l0_tile_size"] / result.result["heatmap"]["hm_downsample"])
        assert period == predictor.fm_size
        h, w = min(prob.shape[0], reference.shape[0]), min(prob.shape[1], reference.shape[1])
        cells = covered[:h, :w]
        scores[mode] = seam_score(np.where(cells, prob[:h, :w], np.nan), period).score
        refs[mode] = seam_score(np.where(cells, reference[:h, :w], np.nan), period).score
    assert scores["tiles"] > 2.0 and scores["tiles"] > 1.4 * scores["auto"], (scores, refs)  # every tile border
    assert scores["auto"] <= max(1.4, 1.2 * refs["auto"]), (scores, refs)  # dense: as seam-free as one pass
