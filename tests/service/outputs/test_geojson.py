"""Golden tests for GeoJSON: a tiny known heatmap gives exactly the expected QuPath features."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from service.outputs.geojson import (
    AREA_KEY,
    GeoJsonError,
    RunTable,
    collect_runs,
    feature_collection,
    find_regions,
    region_features,
    runs_of_band,
    tile_features,
    write_geojson,
)
from service.outputs.stitching import HeatmapBand


def _known_heatmap() -> tuple[np.ndarray, np.ndarray]:
    """A 5x5 square with a one-cell hole, a separate 3x2 blob, and an unanalysed corner."""
    prob = np.zeros((10, 10), np.float32)
    prob[1:6, 1:6] = 0.8
    prob[3, 3] = 0.1  # the hole
    prob[7:9, 6:9] = 0.9
    prob[7, 6] = 0.95
    covered = np.ones((10, 10), bool)
    prob[0, 9] = 0.99
    covered[0, 9] = False  # high probability but not analysed: never positive
    return prob, covered


def _regions(band_height: int = 10) -> list:
    prob, covered = _known_heatmap()
    bands = [
        HeatmapBand(y, prob[y : y + band_height], covered[y : y + band_height])
        for y in range(0, 10, band_height)
    ]
    sink: list[RunTable] = []
    assert list(collect_runs(bands, 0.5, sink)) == bands
    return find_regions(RunTable.concat(sink))


def _features(**kwargs: object) -> list[dict]:
    args: dict = {
        "hm_downsample": 10.0,
        "l0_size_wh": (100, 100),
        "l0_mpp": 0.5,
        "name": "Gland",
        "color": (255, 140, 0),
        "seed": "job-1",
    }
    args.update(kwargs)
    return region_features(_regions(), **args)


def test_runs_of_a_band_hold_position_sum_and_max() -> None:
    prob, covered = _known_heatmap()
    runs = runs_of_band(HeatmapBand(3, prob[3:4], covered[3:4]), 0.5)
    np.testing.assert_array_equal(runs.hm_row, [3, 3])
    np.testing.assert_array_equal(runs.hm_x0, [1, 4])
    np.testing.assert_array_equal(runs.hm_x1, [3, 6])
    np.testing.assert_allclose(runs.prob_sum, [1.6, 1.6], rtol=1e-6)
    np.testing.assert_allclose(runs.prob_max, [0.8, 0.8], rtol=1e-6)


def test_regions_are_exact_cell_edge_polygons_with_holes() -> None:
    square, blob = _regions()
    assert square.cells == 24 and blob.cells == 6
    expected_square = shapely.Polygon(
        [(1, 1), (6, 1), (6, 6), (1, 6)], holes=[[(3, 3), (4, 3), (4, 4), (3, 4)]]
    )
    assert square.hm_polygon.normalize().equals_exact(expected_square.normalize(), 0)
    assert blob.hm_polygon.equals(shapely.box(6, 7, 9, 9))
    assert square.mean_prob == pytest.approx(0.8) and square.max_prob == pytest.approx(0.8)
    assert blob.mean_prob == pytest.approx((0.95 + 5 * 0.9) / 6) and blob.max_prob == pytest.approx(0.95)


@pytest.mark.parametrize("band_height", [1, 3, 4])
def test_regions_do_not_depend_on_the_bands(band_height: int) -> None:
    whole, banded = _regions(10), _regions(band_height)
    assert [r.cells for r in banded] == [r.cells for r in whole]
    for a, b in zip(whole, banded, strict=True):
        assert a.hm_polygon.equals(b.hm_polygon)


def test_diagonal_neighbours_are_separate_regions_and_small_ones_can_be_dropped() -> None:
    prob = np.zeros((4, 4), np.float32)
    prob[0, 0] = prob[1, 1] = prob[2, 2] = prob[3, 3] = 1.0
    prob[2:4, 0:2] = 1.0
    runs = runs_of_band(HeatmapBand(0, prob, np.ones((4, 4), bool)), 0.5)
    # (1,1) and (2,2) share an edge with the block; (0,0) and (3,3) only touch corners
    assert [r.cells for r in find_regions(runs)] == [6, 1, 1]
    assert [r.cells for r in find_regions(runs, min_cells=2)] == [6]


def test_features_carry_qupath_keys_in_the_right_places() -> None:
    features = _features()
    assert len(features) == 2
    for feature in features:
        assert set(feature) == {"type", "id", "geometry", "properties"}
        assert feature["type"] == "Feature"
        assert uuid.UUID(feature["id"]).version == 5
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Gland", "color": [255, 140, 0]}
        assert set(props["measurements"]) == {AREA_KEY, "Mean probability", "Max probability"}
        assert "objectType" not in feature and "name" not in feature
    square, blob = (shape(f["geometry"]) for f in features)
    assert features[0]["geometry"]["type"] == "Polygon"
    assert len(features[0]["geometry"]["coordinates"]) == 2  # exterior, then the hole
    assert square.is_valid and blob.is_valid
    assert square.bounds == (10.0, 10.0, 60.0, 60.0)
    assert square.area == pytest.approx(2500 - 100)
    assert shapely.Polygon(features[0]["geometry"]["coordinates"][1]).bounds == (30.0, 30.0, 40.0, 40.0)
    assert blob.bounds == (60.0, 70.0, 90.0, 90.0)
    # area in square microns: cells x (10 l0 px x 0.5 um)^2
    assert features[0]["properties"]["measurements"][AREA_KEY] == pytest.approx(24 * 25.0)
    assert features[1]["properties"]["measurements"][AREA_KEY] == pytest.approx(6 * 25.0)
    assert features[1]["properties"]["measurements"]["Max probability"] == pytest.approx(0.95)
    exterior = shapely.LinearRing(features[0]["geometry"]["coordinates"][0])
    assert exterior.is_ccw  # RFC 7946 orientation


def test_ids_are_reproducible_with_a_seed_and_random_without() -> None:
    assert [f["id"] for f in _features()] == [f["id"] for f in _features()]
    assert [f["id"] for f in _features(seed=None)] != [f["id"] for f in _features(seed=None)]
    assert uuid.UUID(_features(seed=None)[0]["id"]).version == 4


def test_bounds_offset_moves_into_the_qupath_frame_and_edges_are_clipped() -> None:
    features = _features(l0_offset_xy=(5.0, 7.0), l0_size_wh=(85, 100))
    square, blob = (shape(f["geometry"]) for f in features)
    assert square.bounds == (5.0, 3.0, 55.0, 53.0)
    assert blob.bounds == (55.0, 63.0, 80.0, 83.0)  # clipped at the slide's right edge (x = 85)
    assert features[1]["properties"]["measurements"][AREA_KEY] == pytest.approx(25 * 20 * 0.25)


def test_coordinates_have_at_most_two_decimals() -> None:
    features = _features(hm_downsample=3.333333)
    for ring in features[0]["geometry"]["coordinates"]:
        for x, y in ring:
            assert round(x, 2) == x and round(y, 2) == y


def test_tile_features_are_squares_with_probability_measurements() -> None:
    l0_xy = np.array([[0, 0], [448, 0]])
    probs = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    features = list(
        tile_features(
            l0_xy,
            448.0,
            probs,
            np.array([0.25, 0.5]),
            class_names=["benign", "malignant"],
            class_colors=[[0, 255, 0], [255, 0, 0]],
            positive_index=1,
            l0_offset_xy=(10.0, 20.0),
            seed="j",
        )
    )
    assert [f["properties"]["objectType"] for f in features] == ["tile", "tile"]
    assert shape(features[1]["geometry"]).bounds == (438.0, -20.0, 886.0, 428.0)
    assert features[1]["properties"]["measurements"] == {"probability": 0.7, "fg_mean": 0.5}
    assert features[0]["properties"]["classification"]["name"] == "benign"
    with pytest.raises(GeoJsonError, match="planned tiles"):
        tile_features(
            l0_xy,
            448.0,
            probs[:1],
            np.zeros(2),
            class_names=["a", "b"],
            class_colors=[[0, 0, 0]] * 2,
            positive_index=1,
        )


@pytest.mark.parametrize("name", ["result.geojson", "result.geojson.gz"])
def test_written_collection_reads_back(tmp_path: Path, name: str) -> None:
    metadata = {"frame": {"l0_offset_xy": [0, 0]}}
    features = _features()
    assert write_geojson(tmp_path / name, iter(features), metadata) == 2
    raw = (tmp_path / name).read_bytes()
    data = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    assert data == json.loads(json.dumps(feature_collection(features, metadata)))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert write_geojson(tmp_path / name, iter([]), metadata) == 0
    raw = (tmp_path / name).read_bytes()
    assert json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)["features"] == []


def test_no_positive_cells_give_no_regions() -> None:
    band = HeatmapBand(0, np.zeros((3, 3), np.float32), np.ones((3, 3), bool))
    assert find_regions(runs_of_band(band, 0.5)) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_give_exact_4_connected_outlines(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random((40, 60)) < 0.5  # many holes, corner contacts and self-touching shapes
    band = HeatmapBand(0, positive.astype(np.float32), np.ones(positive.shape, bool))
    regions = find_regions(runs_of_band(band, 0.5))
    count, labels = cv2.connectedComponents(positive.astype(np.uint8), connectivity=4)
    assert len(regions) == count - 1
    assert sum(r.cells for r in regions) == positive.sum()
    for region in regions:
        assert region.hm_polygon.is_valid
        assert region.hm_polygon.area == pytest.approx(region.cells)  # cell edges, exactly
        ys, xs = np.mgrid[0:40, 0:60]
        inside = shapely.contains_xy(region.hm_polygon, xs + 0.5, ys + 0.5)
        (label,) = np.unique(labels[inside])  # the cells inside are one component...
        np.testing.assert_array_equal(inside, labels == label)  # ...and all of it


def test_regions_converted_together_match_each_converted_alone() -> None:
    rng = np.random.default_rng(3)
    positive = rng.random((30, 40)) < 0.55  # holes and self-touching shapes among many regions
    band = HeatmapBand(0, positive.astype(np.float32), np.ones(positive.shape, bool))
    regions = find_regions(runs_of_band(band, 0.5), min_cells=3)
    assert len(regions) > 5 and any(shapely.get_num_interior_rings(r.hm_polygon) for r in regions)
    kwargs = {"hm_downsample": 4.0, "l0_size_wh": (150, 110), "l0_mpp": 0.5, "name": "Gland", "color": (1, 2, 3)}
    together = {  # the slide (150 x 110) ends inside the heatmap (160 x 120): some regions are clipped away
        int(f["properties"]["name"].split()[-1]) - 1: f
        for f in region_features(regions, **kwargs, l0_offset_xy=(2.0, 1.0), seed="s")
    }
    assert 0 < len(together) < len(regions)
    for i, region in enumerate(regions):
        alone = region_features([region], **kwargs, l0_offset_xy=(2.0, 1.0), seed="s")
        assert len(alone) == (i in together)
        if alone:
            assert together[i]["geometry"] == alone[0]["geometry"]
            assert together[i]["properties"]["measurements"] == alone[0]["properties"]["measurements"]
            assert shape(alone[0]["geometry"]).is_valid


def test_tile_objects_past_the_slide_edge_are_cut_at_it() -> None:
    # a 2220 x 2967 px slide (CMU-1-Small-Region) whose last column and row of tiles run past its edges
    l0_xy = np.array([[1800, 0], [0, 2600], [1800, 2600], [0, 0]])
    features = list(tile_features(l0_xy, 448.0, np.full((4, 2), 0.5, np.float32), np.zeros(4),
                                  class_names=["a", "b"], class_colors=[[0, 0, 0]] * 2, positive_index=1,
                                  l0_size_wh=(2220, 2967)))
    bounds = [shape(f["geometry"]).bounds for f in features]
    assert bounds == [(1800.0, 0.0, 2220.0, 448.0), (0.0, 2600.0, 448.0, 2967.0),
                      (1800.0, 2600.0, 2220.0, 2967.0), (0.0, 0.0, 448.0, 448.0)]
    assert all(shape(f["geometry"]).is_valid for f in features)
