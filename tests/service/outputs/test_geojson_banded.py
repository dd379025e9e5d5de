"""Band-by-band region grouping and batched features give exactly the whole-table results, holding little."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely

from service.outputs.geojson import (
    GeoJsonError,
    Region,
    RegionGrouper,
    RunTable,
    collect_runs,
    find_regions,
    iter_region_features,
    region_features,
    runs_of_band,
)
from service.outputs.stitching import HeatmapBand, HeatmapGrid, encode_heatmap, render_overlay


def _bands(prob: np.ndarray, covered: np.ndarray, height: int) -> list[HeatmapBand]:
    return [
        HeatmapBand(y, prob[y : y + height], covered[y : y + height]) for y in range(0, prob.shape[0], height)
    ]


def _grouped(prob: np.ndarray, height: int, min_cells: int = 1, threshold: float = 0.5) -> list[Region]:
    """Regions from a grouper fed one band at a time, as the finalisation does."""
    grouper = RegionGrouper(min_cells)
    bands = _bands(prob, np.ones(prob.shape, bool), height)
    assert list(collect_runs(bands, threshold, grouper)) == bands
    return grouper.regions()


def _key(regions: list[Region]) -> list[tuple[bytes, int, float, float]]:
    """Everything a region carries, exactly (WKB keeps the vertex order and the float bits)."""
    return [(shapely.to_wkb(r.hm_polygon), r.cells, r.mean_prob, r.max_prob) for r in regions]


def _random_heatmap(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth blobs (large regions with holes, U-shapes and bays) plus speckle, as probabilities."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 6 + 2, w // 6 + 2)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    speckle = rng.random((h, w)).astype(np.float32)
    return np.where(rng.random((h, w)) < 0.08, speckle, smooth)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_banded_grouping_equals_the_whole_table_and_opencv_components(seed: int) -> None:
    prob = _random_heatmap(seed, 97, 83)
    whole = find_regions(runs_of_band(HeatmapBand(0, prob, np.ones(prob.shape, bool)), 0.5))
    for height in (1, 2, 3, 7, 40, 97):
        assert _key(_grouped(prob, height)) == _key(whole), height
    positive = (prob >= 0.5).astype(np.uint8)
    count, labels = cv2.connectedComponents(positive, connectivity=4)
    assert len(whole) == count - 1
    ys, xs = np.mgrid[0 : prob.shape[0], 0 : prob.shape[1]]
    for region in whole:
        inside = shapely.contains_xy(region.hm_polygon, xs + 0.5, ys + 0.5)
        (label,) = np.unique(labels[inside])
        np.testing.assert_array_equal(inside, labels == label)
        assert region.mean_prob == pytest.approx(float(prob[inside].astype(np.float64).mean()), rel=1e-12)
        assert region.max_prob == float(prob[inside].max())
    order = [(-r.cells, r.hm_bounds) for r in whole]
    assert order == sorted(order)


def test_a_u_shape_whose_arms_join_many_bands_below_is_one_region_with_its_hole() -> None:
    prob = np.zeros((30, 12), np.float32)
    prob[2:28, 2:4] = prob[2:28, 8:10] = 0.9  # two arms, open at the top...
    prob[26:28, 2:10] = 0.9  # ...joined at the bottom
    prob[10:14, 5:7] = 0.8  # an island in the bay
    regions = _grouped(prob, 3)
    assert [r.cells for r in regions] == [2 * 26 * 2 + 2 * 4, 8]
    u = regions[0].hm_polygon
    assert u.is_valid and u.area == regions[0].cells
    assert shapely.get_num_interior_rings(u) == 0 and u.bounds == (2.0, 2.0, 10.0, 28.0)
    assert _key(regions) == _key(_grouped(prob, 30))


def test_a_w_shape_and_a_ring_spanning_many_bands_keep_holes_and_merge_all_arms() -> None:
    prob = np.zeros((40, 30), np.float32)
    for x in (1, 8, 15, 22):  # four arms joined pairwise at different depths: a W that closes late
        prob[1:35, x : x + 2] = 0.7
    prob[33:35, 1:10] = prob[20:22, 8:17] = prob[33:35, 15:24] = 0.7
    prob[37:40, 0:30] = 0.6  # a bottom bar, separated by one empty row
    ring = np.zeros((40, 30), bool)
    ring[2:12, 26:30] = True
    ring[4:10, 27:29] = False  # a ring: the hole spans several bands
    prob[ring] = 0.9
    for height in (1, 2, 5, 40):
        grouper = RegionGrouper()
        list(collect_runs(_bands(prob, np.ones(prob.shape, bool), height), 0.5, grouper))
        regions = grouper.regions()
        assert sorted(r.cells for r in regions) == sorted([int(ring.sum()), 90, 4 * 34 * 2 + 3 * 10])
        (ring_region,) = (r for r in regions if r.cells == ring.sum())
        assert shapely.get_num_interior_rings(ring_region.hm_polygon) == 1
        assert ring_region.hm_polygon.area == ring.sum()
        assert _key(regions) == _key(_grouped(prob, 40))


def test_only_regions_touching_the_last_row_stay_open_and_small_ones_are_dropped() -> None:
    prob = np.zeros((9, 10), np.float32)
    prob[0:2, 0:2] = 0.9  # 4 cells, ends inside band 0
    prob[1:9, 5] = 0.9  # a column through every band
    prob[4, 2] = 0.9  # a 1-cell speck
    prob[5:7, 8] = 0.9  # 2 cells on rows 5 | 6: the last row of band 1 and the first of band 2
    covered = np.ones(prob.shape, bool)
    grouper = RegionGrouper(min_cells=2)
    opened = []
    for band in _bands(prob, covered, 3):
        grouper.append(runs_of_band(band, 0.5))
        opened.append(grouper.open_regions)
    # the square ends at row 1 and the speck at row 4; the column reaches every band's last row
    assert opened == [1, 2, 1]
    assert [r.cells for r in grouper.regions()] == [8, 4, 2]
    assert grouper.open_regions == 0


def test_an_empty_band_or_a_gap_finishes_the_open_regions() -> None:
    grouper = RegionGrouper()
    grouper.append(runs_of_band(HeatmapBand(0, np.ones((2, 3), np.float32), np.ones((2, 3), bool)), 0.5))
    assert grouper.open_regions == 1
    grouper.append(RunTable.concat([]))
    assert grouper.open_regions == 0
    grouper.append(runs_of_band(HeatmapBand(5, np.ones((1, 3), np.float32), np.ones((1, 3), bool)), 0.5))
    assert [r.cells for r in grouper.regions()] == [6, 3]  # row 5 does not continue rows 0-1


def test_bands_out_of_order_are_refused() -> None:
    grouper = RegionGrouper()
    grouper.append(runs_of_band(HeatmapBand(4, np.ones((1, 2), np.float32), np.ones((1, 2), bool)), 0.5))
    with pytest.raises(GeoJsonError, match="top to bottom"):
        grouper.append(runs_of_band(HeatmapBand(2, np.ones((1, 2), np.float32), np.ones((1, 2), bool)), 0.5))


def test_run_sums_are_float64_sums_of_each_runs_cells() -> None:
    rng = np.random.default_rng(7)
    prob = rng.random((20, 50)).astype(np.float32)
    covered = rng.random((20, 50)) < 0.9
    runs = runs_of_band(HeatmapBand(11, prob, covered), 0.4)
    assert len(runs) > 50
    for r, a, b, total, peak in zip(
        runs.hm_row, runs.hm_x0, runs.hm_x1, runs.prob_sum, runs.prob_max, strict=True
    ):
        cells = prob[r - 11, a:b]
        assert covered[r - 11, a:b].all() and (cells >= 0.4).all()
        assert total == pytest.approx(float(cells.astype(np.float64).sum()), rel=1e-13)
        assert peak == float(cells.max())


@pytest.mark.parametrize("batch_points", [1, 40, 300])
def test_features_in_batches_equal_the_features_of_all_regions(batch_points: int) -> None:
    prob = _random_heatmap(5, 60, 70)
    regions = _grouped(prob, 8, threshold=0.6)
    assert len(regions) > 20
    kwargs = {"hm_downsample": 3.0, "l0_size_wh": (200, 170), "l0_mpp": 0.25, "name": "G", "color": (9, 8, 7)}
    every = region_features(regions, **kwargs, l0_offset_xy=(1.0, 2.0), seed="s")
    batched = list(
        iter_region_features(regions, **kwargs, l0_offset_xy=(1.0, 2.0), seed="s", batch_points=batch_points)
    )
    assert batched == every
    assert 0 < len(every) < len(regions)  # the slide ends inside the heatmap: some regions are clipped away
    assert [f["properties"]["name"] for f in every[:2]] == ["G 1", "G 2"]


def test_banded_overlay_equals_the_formula_on_the_whole_image() -> None:
    grid = HeatmapGrid(l0_size_wh=(800, 1500), hm_downsample=10.0)  # 80 x 150 cells
    rng = np.random.default_rng(2)
    covered = rng.random((150, 80)) < 0.7
    values = encode_heatmap(rng.random((150, 80)).astype(np.float32), covered)
    thumb = rng.integers(0, 256, (300, 160, 3), dtype=np.uint8)  # several blending bands
    overlay = render_overlay(thumb, values, grid, alpha=0.45)
    hm = cv2.resize(values, (160, 300), interpolation=cv2.INTER_NEAREST)
    prob, mask = (hm.astype(np.float32) - 1) / 254, hm > 0
    colour = cv2.applyColorMap(np.rint(np.where(mask, prob, 0) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[
        :, :, ::-1
    ]
    whole = np.where(
        mask[:, :, None], 0.55 * thumb.astype(np.float32) + 0.45 * colour.astype(np.float32), thumb
    )
    np.testing.assert_array_equal(overlay, np.clip(np.rint(whole), 0, 255).astype(np.uint8))
