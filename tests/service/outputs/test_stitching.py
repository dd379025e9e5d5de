"""Golden tests for the stitcher: known tiles give exactly known heatmaps, in bands of any height."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import tiffslide

from service.outputs.stitching import (
    BAND_CELLS,
    NODATA,
    HeatmapGrid,
    StitchError,
    array_loader,
    cosine_window,
    decode_heatmap,
    encode_heatmap,
    read_heatmap_level,
    render_overlay,
    stitch_array,
    stitch_bands,
    tile_footprints,
    write_heatmap_tiff,
    write_overlay_png,
)


def test_two_overlapping_tiles_are_averaged_and_the_rest_is_not_analysed() -> None:
    grid = HeatmapGrid(l0_size_wh=(40, 30), hm_downsample=5.0)  # 8 x 6 cells
    l0_xy = np.array([[0, 0], [10, 0]])
    fg = np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.6)]).astype(np.float32)
    hm = stitch_array(grid, l0_xy, 20.0, fg)
    expected = np.zeros((6, 8), np.float32)
    expected[:4, 0:2] = 0.2
    expected[:4, 2:4] = 0.4
    expected[:4, 4:6] = 0.6
    np.testing.assert_allclose(hm.prob, expected, atol=1e-6)
    covered = np.zeros((6, 8), bool)
    covered[:4, :6] = True
    np.testing.assert_array_equal(hm.covered, covered)


def test_each_output_cell_lands_on_its_own_heatmap_cell() -> None:
    grid = HeatmapGrid(l0_size_wh=(64, 64), hm_downsample=8.0)
    fm = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    hm = stitch_array(grid, np.array([[32, 0]]), 32.0, fm[None])
    np.testing.assert_array_equal(hm.prob[0:4, 4:8], fm)
    assert not hm.covered[:, :4].any() and not hm.covered[4:].any()


def test_tiles_past_the_slide_edge_are_clipped() -> None:
    grid = HeatmapGrid(l0_size_wh=(30, 30), hm_downsample=10.0)  # 3 x 3 cells
    fm = np.arange(4, dtype=np.float32).reshape(2, 2) / 4
    hm = stitch_array(grid, np.array([[20, 20]]), 20.0, fm[None])
    assert hm.prob.shape == (3, 3)
    assert hm.prob[2, 2] == pytest.approx(0.0) and hm.covered[2, 2]
    assert hm.covered.sum() == 1


def _random_plan(seed: int, n: int = 60) -> tuple[HeatmapGrid, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = HeatmapGrid(l0_size_wh=(900, 700), hm_downsample=7.0)
    l0_xy = np.stack([rng.integers(-50, 900, n), rng.integers(-50, 700, n)], axis=1)
    fg = rng.random((n, 8, 8)).astype(np.float32)
    return grid, l0_xy, fg


@pytest.mark.parametrize("band_height", [1, 3, 17, 64])
def test_results_do_not_depend_on_the_band_height(band_height: int) -> None:
    grid, l0_xy, fg = _random_plan(1)
    whole = stitch_array(grid, l0_xy, 56.0, fg, band_height=10_000)
    banded = stitch_array(grid, l0_xy, 56.0, fg, band_height=band_height)
    np.testing.assert_array_equal(banded.prob, whole.prob)
    np.testing.assert_array_equal(banded.covered, whole.covered)


def test_each_band_is_small_and_loads_only_the_tiles_that_meet_it() -> None:
    grid, l0_xy, fg = _random_plan(2)
    footprints = tile_footprints(grid, l0_xy, 56.0)
    requested: list[np.ndarray] = []
    loader = array_loader(fg)

    def recording(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        requested.append(indices)
        return loader(indices)

    bands = list(stitch_bands(grid, l0_xy, 56.0, recording, band_height=5))
    assert len(bands) == len(requested) == 20  # 100 rows / 5
    for band, indices in zip(bands, requested, strict=True):
        assert band.prob.shape[0] <= 5 and band.prob.shape[1] == grid.hm_size_wh[0]
        b0, b1 = band.hm_y0, band.hm_y0 + band.prob.shape[0]
        meets = (footprints[:, 1] < b1) & (footprints[:, 3] > b0)
        np.testing.assert_array_equal(indices, np.flatnonzero(meets))


def test_missing_tiles_leave_cells_not_analysed() -> None:
    grid = HeatmapGrid(l0_size_wh=(40, 20), hm_downsample=5.0)
    l0_xy = np.array([[0, 0], [20, 0]])
    fg = np.ones((2, 4, 4), np.float32)

    def only_first(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kept = indices[indices == 0]
        return kept, fg[kept]

    band = next(stitch_bands(grid, l0_xy, 20.0, only_first))
    assert band.covered[:, :4].all() and not band.covered[:, 4:].any()


def test_plan_rounding_never_opens_a_gap() -> None:
    l0_tile = 448.9  # a tile side that is not a whole number of level-0 pixels
    grid = HeatmapGrid(l0_size_wh=(4000, 500), hm_downsample=l0_tile / 28)
    l0_xy = np.array([[round(i * l0_tile), 0] for i in range(8)])
    footprints = tile_footprints(grid, l0_xy, l0_tile)
    assert (footprints[1:, 0] <= footprints[:-1, 2]).all()
    assert (footprints[:, 2] - footprints[:, 0] == 28).all()
    hm = stitch_array(grid, l0_xy, l0_tile, np.full((8, 28, 28), 0.5, np.float32))
    assert hm.covered[:28, : footprints[-1, 2]].all()


def test_cosine_window_blends_overlaps_and_keeps_single_coverage_exact() -> None:
    grid = HeatmapGrid(l0_size_wh=(40, 20), hm_downsample=5.0)
    l0_xy = np.array([[0, 0], [10, 0]])
    fg = np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.6)]).astype(np.float32)
    hm = stitch_array(grid, l0_xy, 20.0, fg, window=cosine_window((4, 4)))
    np.testing.assert_allclose(hm.prob[:, 0:2], 0.2, atol=1e-6)
    np.testing.assert_allclose(hm.prob[:, 4:6], 0.6, atol=1e-6)
    # column 2 is the edge of tile 2 and the centre of tile 1, so tile 1 dominates there
    assert 0.2 < hm.prob[0, 2] < 0.4 < hm.prob[0, 3] < 0.6


def test_encoding_separates_not_analysed_from_zero_probability() -> None:
    prob = np.array([[0.0, 0.0, 0.5, 1.0]], np.float32)
    covered = np.array([[False, True, True, True]])
    values = encode_heatmap(prob, covered)
    np.testing.assert_array_equal(values, [[NODATA, 1, 128, 255]])
    back, back_covered = decode_heatmap(values)
    np.testing.assert_array_equal(back_covered, covered)
    np.testing.assert_allclose(back[covered], prob[covered], atol=0.5 / 254)


def test_bad_frames_are_refused() -> None:
    with pytest.raises(StitchError, match="hm_downsample"):
        HeatmapGrid(l0_size_wh=(10, 10), hm_downsample=0.0)
    with pytest.raises(StitchError, match="band_height"):
        next(
            stitch_bands(
                HeatmapGrid((10, 10), 1.0),
                np.zeros((0, 2)),
                4.0,
                array_loader(np.zeros((0, 2, 2))),
                band_height=0,
            )
        )


def test_heatmap_tiff_is_a_readable_pyramid_with_the_declared_scale(tmp_path: Path) -> None:
    grid, l0_xy, fg = _random_plan(3, n=200)
    path = tmp_path / "heatmap.tif"
    bands = stitch_bands(grid, l0_xy, 56.0, array_loader(fg), band_height=13)
    sizes = write_heatmap_tiff(path, bands, grid, l0_mpp=0.5, description='{"kind": "test"}', tile=32)
    whole = stitch_array(grid, l0_xy, 56.0, fg)
    assert sizes == [(129, 100), (65, 50), (33, 25), (17, 13)]  # halved until one 32-cell tile holds it
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lvl.shape for lvl in levels] == [(100, 129), (50, 65), (25, 33), (13, 17)]
        level0 = levels[0].asarray()
        level1 = levels[1].asarray()
        assert tif.pages[0].description == '{"kind": "test"}'
        assert tif.pages[0].is_tiled
    np.testing.assert_array_equal(level0, whole.encoded())
    # a level-1 cell is the mean probability of the analysed level-0 cells under it
    prob0, cov0 = decode_heatmap(level0[0:2, 0:2])
    prob1, cov1 = decode_heatmap(level1[0:1, 0:1])
    assert cov1[0, 0] == cov0.any()
    if cov0.any():
        assert prob1[0, 0] == pytest.approx(prob0[cov0].mean(), abs=1 / 254)
    slide = tiffslide.TiffSlide(path)
    try:
        assert slide.dimensions == (129, 100)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5 * 7.0)
    finally:
        slide.close()
    np.testing.assert_array_equal(read_heatmap_level(path, (60, 40)), level1)
    assert not list(tmp_path.glob(".heatmap-*")), "the spill files must be removed"


def test_overlay_tints_only_analysed_cells() -> None:
    grid = HeatmapGrid(l0_size_wh=(400, 200), hm_downsample=10.0)  # 40 x 20 cells
    covered = np.zeros((20, 40), bool)
    covered[:, :20] = True
    values = encode_heatmap(np.full((20, 40), 0.9, np.float32), covered)
    thumb = np.full((100, 200, 3), 240, np.uint8)
    overlay = render_overlay(thumb, values, grid)
    assert overlay.shape == thumb.shape
    np.testing.assert_array_equal(overlay[:, 100:], thumb[:, 100:])
    assert (overlay[:, :100] != thumb[:, :100]).any(axis=2).all()


@pytest.mark.parametrize("l0_width", [10_000, 400_000, 1_000_000])
def test_default_bands_stay_within_the_cell_budget_however_wide_the_slide(l0_width: int) -> None:
    grid = HeatmapGrid(l0_size_wh=(l0_width, 3_000), hm_downsample=8.0)
    l0_xy = np.array([[0, 0], [l0_width - 64, 2_000]])
    fg = np.full((2, 8, 8), 0.5, np.float32)
    bands = list(stitch_bands(grid, l0_xy, 64.0, array_loader(fg)))
    hm_w, hm_h = grid.hm_size_wh
    assert sum(b.prob.shape[0] for b in bands) == hm_h
    assert all(b.prob.size <= max(BAND_CELLS, 8 * hm_w) for b in bands)
    assert sum(int(b.covered.sum()) for b in bands) == 2 * 64


def test_overlay_png_round_trips_and_a_bad_folder_is_explained(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    write_overlay_png(tmp_path / "overlay.png", rgb)
    back = cv2.imread(str(tmp_path / "overlay.png"))[:, :, ::-1]
    np.testing.assert_array_equal(back, rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]
    with pytest.raises(StitchError, match="writable"):
        write_overlay_png(tmp_path / "missing" / "overlay.png", rgb)


def test_nice_lengths_are_1_2_5_steps() -> None:
    from service.outputs.stitching import nice_length

    assert [nice_length(t) for t in (0.7, 1, 3.9, 7, 19, 230, 4999)] == [0.5, 1, 2, 5, 10, 200, 2000]
    with pytest.raises(ValueError):
        nice_length(0)


def test_the_legend_has_the_colour_bar_a_true_scale_bar_and_the_call() -> None:
    from service.outputs.deepzoom import colormap_lut
    from service.outputs.stitching import LEGEND_H, overlay_legend, with_legend

    lut = colormap_lut("turbo")
    strip, info = overlay_legend(900, um_per_px=3.7, threshold=0.3, call="malignant  p=0.990",
                                 detail="model x\nresearch use only", cmap_lut=lut)
    assert strip.shape == (LEGEND_H, 900, 3)
    x0, x1 = info["colour_bar_x"]
    bar = strip[44, x0 + 1 : x1 - 1]  # one row inside the bar: the colour map from 0 to 1, left to right
    assert np.abs(bar[0].astype(int) - lut[0]).max() <= 8 and np.abs(bar[-1].astype(int) - lut[255]).max() <= 8
    um, px = info["scale_bar_um"], info["scale_bar_px"]
    assert um == 500 and px == round(500 / 3.7)  # 1, 2, 5 x 10^k µm, drawn at the image's µm/px
    sx0, sx1 = info["scale_bar_x"]
    dark = np.flatnonzero(strip[44, :, 0] < 60)
    assert dark[(dark >= sx0 - 2) & (dark <= sx1 + 2)].size == px
    assert (strip[:, 600:] < 100).any()  # the call is written on the right
    unknown, info2 = overlay_legend(900, um_per_px=None, threshold=0.3, call="c", detail="d", cmap_lut=lut)
    assert info2["scale_bar_px"] is None and unknown.shape == strip.shape
    small = np.zeros((50, 300, 3), np.uint8)
    framed = with_legend(small, strip)
    assert framed.shape == (50 + LEGEND_H, 900, 3) and (framed[:50, 300:] == 255).all()
    assert (framed[:50, :300] == 0).all() and (framed[50:] == strip).all()
