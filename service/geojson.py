"""Heatmap -> positive regions -> QuPath GeoJSON (FeatureCollection of annotations, optional tile detections).

Planes: `hm_` heatmap cells (`l0 = hm * hm_downsample`) and `l0_` level-0 slide pixels. Output coordinates are
level-0 pixels, origin top-left, y down, minus the slide's bounds offset when it has one (MRXS and other
formats whose `openslide.bounds-*` QuPath crops to), which is the frame QuPath uses; the collection's
`metadata.frame` says which offset was applied.

Regions are polygonised without tracing: each heatmap row's runs of positive cells become boxes, and shapely
unions them into exact cell-edge polygons with holes (4-connected), before simplification.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from service.stitching import HeatmapBand

__all__ = [
    "AREA_KEY",
    "GeoJsonError",
    "Region",
    "RunTable",
    "collect_runs",
    "feature_collection",
    "find_regions",
    "region_features",
    "runs_of_band",
    "tile_features",
    "write_geojson",
]

logger = logging.getLogger(__name__)

AREA_KEY = "Area µm^2"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pixelcam/pixelcam/geojson")
COORD_DECIMALS = 2


class GeoJsonError(ValueError):
    """Inputs that cannot be turned into QuPath GeoJSON."""


@dataclass(frozen=True)
class RunTable:
    """Horizontal runs of positive heatmap cells: row, [x0, x1), and the sum and max probability of each run."""

    hm_row: np.ndarray
    hm_x0: np.ndarray
    hm_x1: np.ndarray
    prob_sum: np.ndarray
    prob_max: np.ndarray

    @staticmethod
    def concat(tables: Sequence[RunTable]) -> RunTable:
        """Join run tables (from successive bands)."""
        if not tables:
            empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
            return RunTable(empty_i, empty_i, empty_i, empty_f, empty_f)
        return RunTable(*(np.concatenate([getattr(t, f) for t in tables]) for f in RunTable.__annotations__))

    def __len__(self) -> int:
        return int(self.hm_row.shape[0])


@dataclass(frozen=True)
class Region:
    """One connected positive region in heatmap cells (exact cell edges, before simplification)."""

    hm_polygon: shapely.Polygon
    cells: int
    mean_prob: float
    max_prob: float

    @property
    def hm_bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in heatmap cells."""
        x0, y0, x1, y1 = self.hm_polygon.bounds
        return (x0, y0, x1, y1)


def runs_of_band(band: HeatmapBand, threshold: float) -> RunTable:
    """The runs of analysed cells with probability >= `threshold` in one band."""
    positive = band.covered & (band.prob >= threshold)
    h, w = positive.shape
    step = np.diff(positive.astype(np.int8), axis=1, prepend=0, append=0)
    rows, x0 = np.nonzero(step == 1)
    _, x1 = np.nonzero(step == -1)
    if rows.size == 0:
        return RunTable.concat([])
    flat = np.concatenate([band.prob.astype(np.float64).ravel(), [0.0]])
    bounds = np.stack([rows * w + x0, rows * w + x1], axis=1).ravel()
    sums = np.add.reduceat(flat, bounds)[::2]
    maxes = np.maximum.reduceat(flat, bounds)[::2]
    return RunTable(rows.astype(np.int64) + band.hm_y0, x0.astype(np.int64), x1.astype(np.int64), sums, maxes)


def collect_runs(
    bands: Iterable[HeatmapBand], threshold: float, sink: list[RunTable]
) -> Iterator[HeatmapBand]:
    """Pass bands through unchanged while appending their positive runs to `sink` (one pass, two consumers)."""
    for band in bands:
        sink.append(runs_of_band(band, threshold))
        yield band


def _stacked_runs(runs: RunTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs with the same [x0, x1) on consecutive rows merged into one rectangle: (x0, y0, x1, y1) arrays.

    The union then sees far fewer boxes (a blob of h rows of equal width is one box, not h).
    """
    order = np.lexsort((runs.hm_row, runs.hm_x1, runs.hm_x0))
    x0, x1, row = runs.hm_x0[order], runs.hm_x1[order], runs.hm_row[order]
    starts = np.ones(order.size, bool)
    starts[1:] = (x0[1:] != x0[:-1]) | (x1[1:] != x1[:-1]) | (row[1:] != row[:-1] + 1)
    first = np.flatnonzero(starts)
    last = np.append(first[1:], order.size) - 1
    return x0[first], row[first], x1[first], row[last] + 1


def find_regions(runs: RunTable, *, min_cells: int = 1) -> list[Region]:
    """Union the runs into connected regions with holes; drop regions smaller than `min_cells`."""
    if len(runs) == 0:
        return []
    boxes = shapely.box(*_stacked_runs(runs))
    # tolerance 0 only drops the collinear vertices the box corners leave along straight edges
    parts = list(shapely.simplify(shapely.get_parts(shapely.union_all(boxes)), 0.0))
    tree = shapely.STRtree(parts)
    centres = shapely.points(runs.hm_x0 + 0.5, runs.hm_row + 0.5)
    run_idx, part_idx = tree.query(centres, predicate="within")
    cells = np.bincount(part_idx, weights=(runs.hm_x1 - runs.hm_x0)[run_idx], minlength=len(parts))
    sums = np.bincount(part_idx, weights=runs.prob_sum[run_idx], minlength=len(parts))
    maxes = np.zeros(len(parts))
    np.maximum.at(maxes, part_idx, runs.prob_max[run_idx])
    regions = [
        Region(hm_polygon=p, cells=int(c), mean_prob=float(s / c), max_prob=float(m))
        for p, c, s, m in zip(parts, cells, sums, maxes, strict=True)
        if c >= min_cells
    ]
    regions.sort(key=lambda r: (-r.cells, r.hm_bounds))
    return regions


def _feature_id(seed: str | None, kind: str, index: int) -> str:
    """A UUID: reproducible (uuid5) when a job seed is given, else random."""
    if seed is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_NAMESPACE, f"{seed}/{kind}/{index}"))


def _round_coords(coords: np.ndarray) -> np.ndarray:
    return np.round(coords, COORD_DECIMALS)


def _geometry(geom: BaseGeometry) -> dict[str, Any]:
    """A GeoJSON geometry dict with exterior rings counter-clockwise (RFC 7946), coordinates to 2 decimals.

    The precision grid keeps the rounded geometry valid; the final rounding only removes binary noise such as
    12.340000000000002, so coordinates print as QuPath writes them.
    """
    geom = shapely.orient_polygons(shapely.set_precision(geom, 10.0**-COORD_DECIMALS))
    data = mapping(shapely.transform(geom, _round_coords))
    return {"type": data["type"], "coordinates": data["coordinates"]}


def _to_l0(
    hm_geom: BaseGeometry, hm_downsample: float, l0_offset_xy: tuple[float, float], l0_clip: BaseGeometry
) -> BaseGeometry:
    """Scale heatmap cells to level-0 pixels, clip to the slide, then shift into the output frame."""
    ds = float(hm_downsample)
    geom = shapely.intersection(shapely.affinity.scale(hm_geom, ds, ds, origin=(0, 0)), l0_clip)
    return shapely.affinity.translate(geom, -l0_offset_xy[0], -l0_offset_xy[1])


def region_features(
    regions: Sequence[Region],
    *,
    hm_downsample: float,
    l0_size_wh: tuple[int, int],
    l0_mpp: float,
    name: str,
    color: Sequence[int],
    l0_offset_xy: tuple[float, float] = (0.0, 0.0),
    simplify_hm: float = 0.5,
    seed: str | None = None,
) -> list[dict[str, Any]]:
    """QuPath annotations, one per region: Polygon (or MultiPolygon after clipping), with area and probability."""
    l0_clip = shapely.box(0, 0, *l0_size_wh)
    features = []
    for i, region in enumerate(regions):
        simple = shapely.simplify(region.hm_polygon, simplify_hm, preserve_topology=True)
        if not simple.is_valid:
            simple = shapely.make_valid(simple, method="structure")
        exact_l0 = _to_l0(region.hm_polygon, hm_downsample, (0.0, 0.0), l0_clip)
        geom = _to_l0(simple, hm_downsample, l0_offset_xy, l0_clip)
        if geom.is_empty or not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            geom = shapely.union_all([g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)])
            if geom.is_empty:
                continue
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(seed, "region", i),
                "geometry": _geometry(geom),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} {i + 1}",
                    "classification": {"name": name, "color": [int(c) for c in color]},
                    "measurements": {
                        AREA_KEY: round(exact_l0.area * l0_mpp**2, 2),
                        "Mean probability": round(region.mean_prob, 4),
                        "Max probability": round(region.max_prob, 4),
                    },
                },
            }
        )
    return features


def tile_features(
    l0_xy: np.ndarray,
    l0_tile_size: float,
    class_probs: np.ndarray,
    fg_mean: np.ndarray,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
    positive_index: int,
    l0_offset_xy: tuple[float, float] = (0.0, 0.0),
    seed: str | None = None,
) -> list[dict[str, Any]]:
    """QuPath tile objects (one square per analysed tile) carrying probabilities for measurement maps."""
    if class_probs.shape[0] != l0_xy.shape[0] or fg_mean.shape[0] != l0_xy.shape[0]:
        raise GeoJsonError(
            f"{l0_xy.shape[0]} tiles but {class_probs.shape[0]} class rows and {fg_mean.shape[0]} fg means; "
            "pass the outputs of exactly the planned tiles"
        )
    features = []
    side = float(l0_tile_size)
    for i, ((x, y), probs, fg) in enumerate(zip(l0_xy.tolist(), class_probs, fg_mean, strict=True)):
        x0, y0 = x - l0_offset_xy[0], y - l0_offset_xy[1]
        top = int(np.argmax(probs))
        ring = [[x0, y0], [x0, y0 + side], [x0 + side, y0 + side], [x0 + side, y0], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(seed, "tile", i),
                "geometry": {"type": "Polygon", "coordinates": [np.round(ring, COORD_DECIMALS).tolist()]},
                "properties": {
                    "objectType": "tile",
                    "classification": {
                        "name": class_names[top],
                        "color": [int(c) for c in class_colors[top]],
                    },
                    "measurements": {
                        "probability": round(float(probs[positive_index]), 4),
                        "fg_mean": round(float(fg), 4),
                    },
                },
            }
        )
    return features


def feature_collection(features: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """The FeatureCollection QuPath reads, with provenance and the coordinate frame in `metadata`."""
    return {"type": "FeatureCollection", "features": features, "metadata": metadata}


def write_geojson(path: str | os.PathLike[str], collection: dict[str, Any]) -> Path:
    """Write the collection atomically; a path ending in `.gz` is gzipped (QuPath opens `.geojson.gz`)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    data = json.dumps(collection, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if out.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    tmp.write_bytes(data)
    os.replace(tmp, out)
    logger.info("GeoJSON written: %s (%d features)", out, len(collection["features"]))
    return out
