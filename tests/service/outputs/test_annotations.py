"""QuPath GeoJSON annotations read back: polygons with holes and classes, rasterised by pixel centres."""

from __future__ import annotations

import numpy as np
import pytest

from service.outputs.annotations import (
    AnnotationError,
    class_counts,
    mask_to_features,
    parse_annotations,
    rasterize,
    select_classes,
)


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(rings: list, name: str | None = "Tumor", kind: str = "Polygon") -> dict:
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": rings}, "properties": props}


def test_polygons_holes_and_multipolygons_are_read_with_their_class() -> None:
    doc = {"type": "FeatureCollection", "features": [
        _feature([_square(0, 0, 10, 10), _square(4, 4, 6, 6)]),
        _feature([[_square(20, 0, 30, 10)], [_square(40, 0, 50, 10)]], name="Stroma", kind="MultiPolygon"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        _feature([_square(60, 0, 70, 10)], name=None),
    ]}
    polys = parse_annotations(doc)
    assert len(polys) == 4 and class_counts(polys) == {"Tumor": 1, "Stroma": 2, "": 1}
    assert polys[0].l0_area == pytest.approx(100 - 4) and len(polys[0].rings) == 2
    assert [p.name for p in select_classes(polys, ["tumor"])] == ["Tumor"]
    # a bare list of features (QuPath's other export) reads the same
    assert len(parse_annotations(doc["features"])) == 4


def _centres_within(lo: float, hi: float, n: int) -> np.ndarray:
    """(n, n) bool: pixels whose centre (i + 0.5, j + 0.5) lies in [lo, hi] on both axes."""
    c = np.arange(n) + 0.5
    inside = (c >= lo) & (c <= hi)
    return inside[:, None] & inside[None, :]


def test_rasterize_takes_pixels_by_their_centres_and_skips_holes() -> None:
    polys = parse_annotations({"type": "FeatureCollection", "features": [
        _feature([_square(2, 2, 18, 18), _square(8, 8, 12, 12)])]})
    mask = rasterize(polys, (0, 0), 1.0, (20, 20))
    # centres more than half a pixel inside are in, more than half a pixel outside are out; on the outline itself
    # (within half a pixel) OpenCV's fill may go either way
    surely_in = _centres_within(2.5, 17.5, 20) & ~_centres_within(7.5, 12.5, 20)
    surely_out = ~_centres_within(1.5, 18.5, 20) | _centres_within(8.5, 11.5, 20)
    assert mask[surely_in].all() and not mask[surely_out].any()
    # a window elsewhere at half resolution: window pixel (i, j) covers l0 [4 + 2i, 4 + 2i + 2)
    half = rasterize(polys, (4, 4), 0.5, (10, 10))
    assert half[0, 0] and half[5, 5] and not half[3, 3] and not half[8, 8]
    assert not rasterize(polys, (100, 100), 1.0, (8, 8)).any()


def test_mask_to_features_round_trips_through_rasterize() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 160), bool)
    for _ in range(8):
        y, x = rng.integers(10, 100), rng.integers(10, 140)
        mask[y - 8 : y + 9, x - 12 : x + 13] = True
    features = mask_to_features(mask, "Gland", l0_offset_xy=(1000, 500))
    polys = parse_annotations({"type": "FeatureCollection", "features": features})
    assert {p.name for p in polys} == {"Gland"}
    back = rasterize(polys, (1000, 500), 1.0, (160, 120))
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize(("doc", "message"), [
    ({"type": "Feature", "geometry": None}, "must be a GeoJSON FeatureCollection"),
    ("text", "must be a GeoJSON FeatureCollection"),
    ({"type": "FeatureCollection", "features": {}}, "'features' must be a list"),
    ({"type": "FeatureCollection", "features": []}, "holds no Polygon"),
    ({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}]}, "holds no Polygon"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [1, 1]]])]}, "at least 3"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [1, "a"], [2, 2]]])]}, "list of \\[x, y\\]"),
    ({"type": "FeatureCollection", "features": [_feature([[[0, 0], [1, float("nan")], [2, 2]]])]}, "non-finite"),
])
def test_documents_that_are_not_polygon_collections_are_refused(doc: object, message: str) -> None:
    with pytest.raises(AnnotationError, match=message):
        parse_annotations(doc)
