"""Dense inference: regions of tiles with a context halo, cut back into per-tile outputs, on the real CMU slide."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from service.analysis.inference import plan_reader, run_chunk
from service.analysis.plan import AnalysisOptions, InvalidOptionsError, dense_layout, prepare_job
from service.slide.tiling import detect_tissue, plan_regions, plan_tiles
from service.slide.wsi import open_slide


@pytest.fixture(scope="module")
def cmu_tiles(cmu_small_path: Path):
    with open_slide(cmu_small_path) as slide:
        return plan_tiles(slide.info, detect_tissue(slide), input_mpp=1.0, input_size=224)


def test_regions_cover_their_tiles_edge_to_edge(cmu_tiles) -> None:
    regions = plan_regions(cmu_tiles, tiles_per_side=2, halo_in=64)
    tiles = cmu_tiles.take(regions.t_order)
    assert sorted(regions.t_order.tolist()) == list(range(len(cmu_tiles)))
    assert np.all(np.diff(regions.t_region) >= 0), "tiles are in region-major order"
    ranges = regions.tile_ranges()
    assert sum(len(r) for r in ranges) == len(tiles) and all(len(r) >= 1 for r in ranges)
    halo_l0 = 64 * cmu_tiles.lvl_tile_size / cmu_tiles.input_size * cmu_tiles.level_downsample
    for r, tile_range in enumerate(ranges):
        core = regions.reads.l0_xy[r] + halo_l0
        for t in tile_range:
            expected = core + regions.t_cell_xy[t] * cmu_tiles.l0_stride
            # tile corners snap to the read lattice (2 level-0 px here)
            assert np.abs(tiles.l0_xy[t] - expected).max() <= cmu_tiles.extra["l0_align"]
    assert regions.region_input_size == 2 * 224 + 2 * 64
    # rectangles over the tissue: at most 2 x 2 tiles, and each holds only grid cells its kept tiles span
    wh = regions.r_tiles_wh
    assert wh.min() >= 1 and wh.max() <= 2
    for r, tile_range in enumerate(ranges):
        cells = regions.t_cell_xy[tile_range.start:tile_range.stop]
        assert cells[:, 0].min() == 0 and cells[:, 1].min() == 0
        assert (cells.max(axis=0) + 1 == wh[r]).all(), "trimmed to the tiles it holds"
        assert regions.crop_in_wh(r) == (wh[r][0] * 224 + 128, wh[r][1] * 224 + 128)
    assert regions.reads.lvl_tile_size == 2 * cmu_tiles.lvl_tile_size + 2 * 64 * 2  # CMU reads 448 l0 px per tile
    with pytest.raises(ValueError, match="no-overlap"):
        plan_regions(dataclasses.replace(cmu_tiles, overlap=0.5), 2, 64)


def test_one_tile_regions_without_halo_are_exactly_the_tile_model(
    cmu_small_path: Path, random_predictor, tmp_path: Path
) -> None:
    """Cutting and pooling are exact: a 1-tile region with no halo is the tile itself, so dense = tiles."""
    dense = prepare_job(cmu_small_path, random_predictor.metadata,
                        AnalysisOptions(inference="dense", region_tiles=1, halo_px=0), tmp_path / "d")
    tiles = prepare_job(cmu_small_path, random_predictor.metadata, AnalysisOptions(inference="tiles"),
                        tmp_path / "t")
    with open_slide(cmu_small_path) as slide:
        a = run_chunk(slide, dense, range(len(dense)), random_predictor)
        b = run_chunk(slide, tiles, range(len(tiles)), random_predictor)
    order = {tuple(xy): i for i, xy in enumerate(tiles.l0_xy.tolist())}
    perm = [order[tuple(xy)] for xy in dense.l0_xy.tolist()]
    np.testing.assert_allclose(a.fg_prob, b.fg_prob[perm], atol=1e-5)
    np.testing.assert_allclose(a.class_probs, b.class_probs[perm], atol=1e-5)


def test_a_tile_inside_a_region_is_its_window_of_the_region_output(
    cmu_small_path: Path, random_predictor, tmp_path: Path
) -> None:
    plan = prepare_job(cmu_small_path, random_predictor.metadata,
                       AnalysisOptions(inference="dense", region_tiles=2, halo_px=32), tmp_path)
    regions = plan.region_plan
    assert regions is not None
    first = regions.tile_ranges()[0]
    with open_slide(cmu_small_path) as slide, plan_reader(slide, plan) as reader:
        region = reader.read([0])
        out = run_chunk(slide, plan, first, random_predictor, reader=reader)
    assert region.shape == (1, 2 * 224 + 64, 2 * 224 + 64, 3)  # squares as large as the largest region
    w, h = regions.crop_in_wh(0)
    pred = random_predictor.predict_dense(np.ascontiguousarray(region[:, :h, :w]))
    for row, t in enumerate(first):
        cx, cy = regions.t_cell_xy[t]
        y0, x0 = 32 // 8 + cy * 28, 32 // 8 + cx * 28
        np.testing.assert_allclose(out.fg_prob[row], pred.fg_prob[0, y0:y0 + 28, x0:x0 + 28], atol=1e-6)
        logits = pred.class_logits[0, :, y0:y0 + 28, x0:x0 + 28].mean(axis=(1, 2))
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(out.class_probs[row], probs, atol=1e-5)


def test_auto_is_dense_for_a_dense_model_and_refusals_say_why(random_predictor) -> None:
    meta = random_predictor.metadata
    assert meta.dense
    assert dense_layout(AnalysisOptions(), meta) == {"tiles_per_side": 8, "halo_in": 96}
    assert dense_layout(AnalysisOptions(overlap=0.5), meta) is None  # overlap asks for tiles
    assert dense_layout(AnalysisOptions(inference="tiles"), meta) is None
    with pytest.raises(InvalidOptionsError, match="needs overlap 0"):
        dense_layout(AnalysisOptions(inference="dense", overlap=0.5), meta)
    with pytest.raises(InvalidOptionsError, match="multiple of the model's output stride"):
        dense_layout(AnalysisOptions(inference="dense", halo_px=60), meta)
    v1 = dataclasses.replace(meta, format_version=1)
    assert dense_layout(AnalysisOptions(), v1) is None
    with pytest.raises(InvalidOptionsError, match="format_version 2"):
        dense_layout(AnalysisOptions(inference="dense"), v1)


def test_tissue_rectangles_cost_less_than_a_fixed_grid(cmu_tiles) -> None:
    """The regions follow the tissue: fewer model pixels than fixed 6 x 6 blocks would need on CMU."""
    regions = plan_regions(cmu_tiles, tiles_per_side=6, halo_in=128)
    grid = cmu_tiles.t_grid_xy
    blocks = len({(int(x) // 6, int(y) // 6) for x, y in grid})
    fixed_grid_pixels = blocks * (6 * 224 + 256) ** 2
    assert regions.input_pixels() < fixed_grid_pixels
    assert regions.input_pixels() >= len(cmu_tiles) * 224 ** 2  # every kept tile is computed
