"""Heatmap -> positive regions -> QuPath GeoJSON (FeatureCollection of annotations, optional tile detections).

Planes: `hm_` heatmap cells (`l0 = hm * hm_downsample`) and `l0_` level-0 slide pixels. Output coordinates are
level-0 pixels, origin top-left, y down, minus the slide's bounds offset when it has one (MRXS and other
formats whose `openslide.bounds-*` QuPath crops to), which is the frame QuPath uses; the collection's
`metadata.frame` says which offset was applied.

Regions are polygonised from each heatmap row's runs of positive cells: runs are grouped into 4-connected
components, and OpenCV traces each component's outline and holes on a doubled grid whose pixels map back to
exact cell edges (see `service._outlines`), before shapely checks validity and simplifies.
"""

from __future__ import annotations

import gzip
import io
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
from shapely.geometry.base import BaseGeometry

from service._outlines import outlines, traced_rings
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

    hm_polygon: BaseGeometry  # Polygon (MultiPolygon only where a shape touches itself at a corner)
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


def _components(runs: RunTable) -> np.ndarray:
    """Label of each run's 4-connected component (runs on adjacent rows that overlap in x are connected)."""
    n = len(runs)
    row, x0, x1 = runs.hm_row, runs.hm_x0, runs.hm_x1
    span = int(max(x1.max(), 1)) + 1
    # runs are sorted by (row, x0) and disjoint within a row, so x1 is sorted the same way
    key_x0, key_x1 = row * span + x0, row * span + x1
    lo = np.searchsorted(key_x1, (row - 1) * span + x0, side="right")
    hi = np.searchsorted(key_x0, (row - 1) * span + x1, side="left")
    counts = np.maximum(hi - lo, 0)
    below = np.repeat(np.arange(n), counts)
    above = np.concatenate(
        [np.arange(a, b) for a, b in zip(lo, hi, strict=True) if b > a] or [np.zeros(0, np.int64)]
    )
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(below.tolist(), above.tolist(), strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(n)], np.int64)


def find_regions(runs: RunTable, *, min_cells: int = 1) -> list[Region]:
    """Group the runs into 4-connected regions with holes; drop regions smaller than `min_cells`."""
    if len(runs) == 0:
        return []
    order = np.lexsort((runs.hm_x0, runs.hm_row))
    runs = RunTable(*(getattr(runs, f)[order] for f in RunTable.__annotations__))
    labels = _components(runs)
    by_label = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.diff(labels[by_label], prepend=-1))
    lengths = runs.hm_x1 - runs.hm_x0
    kept, traced = [], []
    for members in np.split(by_label, starts[1:]):
        cells = int(lengths[members].sum())
        if cells >= min_cells:
            kept.append((members, cells))
            traced.append(traced_rings(runs.hm_row[members], runs.hm_x0[members], runs.hm_x1[members]))
    if not kept:
        return []
    regions = [
        Region(
            hm_polygon=outline,
            cells=cells,
            mean_prob=float(runs.prob_sum[members].sum() / cells),
            max_prob=float(runs.prob_max[members].max()),
        )
        for (members, cells), outline in zip(kept, outlines(traced), strict=True)
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


def _coordinates(geoms: np.ndarray) -> list[list[Any]]:
    """GeoJSON `coordinates` of Polygons / MultiPolygons, read from shapely in bulk (rings as lists of [x, y])."""
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    xy, point_of = shapely.get_coordinates(rings, return_index=True)
    points = xy.tolist()
    ends = np.cumsum(np.bincount(point_of, minlength=len(rings))).tolist()
    ring_coords = [points[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    ring_ends = np.cumsum(np.bincount(ring_of, minlength=len(parts))).tolist()
    part_coords = [ring_coords[a:b] for a, b in zip([0, *ring_ends[:-1]], ring_ends, strict=True)]
    part_ends = np.cumsum(np.bincount(part_of, minlength=len(geoms))).tolist()
    multi = shapely.get_type_id(geoms) == shapely.GeometryType.MULTIPOLYGON
    return [
        part_coords[a:b] if is_multi else part_coords[a]
        for a, b, is_multi in zip([0, *part_ends[:-1]], part_ends, multi.tolist(), strict=True)
    ]


def _geometries(geoms: np.ndarray) -> list[dict[str, Any]]:
    """GeoJSON geometry dicts with exterior rings counter-clockwise (RFC 7946), coordinates to 2 decimals.

    Vertices lie on cell edges (or the slide's edge), far apart compared with 0.01 px, so rounding keeps the
    geometry valid; should it not, a precision grid snaps it validly first.
    """
    rounded = shapely.transform(shapely.orient_polygons(geoms), _round_coords)
    for i in np.flatnonzero(~shapely.is_valid(rounded)).tolist():
        snapped = shapely.set_precision(geoms[i], 10.0**-COORD_DECIMALS)
        rounded[i] = shapely.transform(shapely.orient_polygons(snapped), _round_coords)
    kinds = ["MultiPolygon" if t == shapely.GeometryType.MULTIPOLYGON else "Polygon"
             for t in shapely.get_type_id(rounded).tolist()]
    return [{"type": k, "coordinates": c} for k, c in zip(kinds, _coordinates(rounded), strict=True)]


def _to_l0(
    hm_geom: BaseGeometry,
    hm_downsample: float,
    l0_offset_xy: tuple[float, float],
    l0_clip: BaseGeometry | None,
) -> BaseGeometry:
    """Scale heatmap cells to level-0 pixels, clip to the slide (if it may cross the edge), shift to the frame."""
    ds = float(hm_downsample)
    geom = shapely.transform(hm_geom, lambda xy: xy * ds - np.asarray(l0_offset_xy))
    if l0_clip is None:
        return geom
    return shapely.intersection(geom, shapely.affinity.translate(l0_clip, -l0_offset_xy[0], -l0_offset_xy[1]))


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
    """QuPath annotations, one per region: Polygon (or MultiPolygon after clipping), with area and probability.

    The shapely work runs on all regions at once (simplify, scale, orient, round); only the rare regions that
    cross the slide's edge or turn invalid are handled one by one.
    """
    if not regions:
        return []
    l0_clip = shapely.box(0, 0, *l0_size_wh)
    hm = np.array([r.hm_polygon for r in regions], dtype=object)
    simple = shapely.simplify(hm, simplify_hm, preserve_topology=True)
    for i in np.flatnonzero(~shapely.is_valid(simple)).tolist():
        simple[i] = shapely.make_valid(simple[i], method="structure")
    hm_bounds = shapely.bounds(hm)
    crosses = (hm_bounds[:, 2] * hm_downsample > l0_size_wh[0]) | (hm_bounds[:, 3] * hm_downsample > l0_size_wh[1])
    geoms = _to_l0(simple, hm_downsample, l0_offset_xy, None)
    l0_area = np.array([r.cells for r in regions], np.float64) * float(hm_downsample) ** 2  # exact: cell edges
    kept = []
    for i in range(len(regions)):
        if crosses[i]:
            l0_area[i] = _to_l0(regions[i].hm_polygon, hm_downsample, (0.0, 0.0), l0_clip).area
            geoms[i] = _to_l0(simple[i], hm_downsample, l0_offset_xy, l0_clip)
        geom = geoms[i]
        if geom.is_empty or not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            geoms[i] = shapely.union_all([g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)])
            if geoms[i].is_empty:
                continue
        kept.append(i)
    geometries = _geometries(geoms[kept]) if kept else []
    return [
        {
            "type": "Feature",
            "id": _feature_id(seed, "region", i),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "name": f"{name} {i + 1}",
                "classification": {"name": name, "color": [int(c) for c in color]},
                "measurements": {
                    AREA_KEY: round(float(l0_area[i]) * l0_mpp**2, 2),
                    "Mean probability": round(regions[i].mean_prob, 4),
                    "Max probability": round(regions[i].max_prob, 4),
                },
            },
        }
        for i, geometry in zip(kept, geometries, strict=True)
    ]


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
) -> Iterator[dict[str, Any]]:
    """QuPath tile objects (one square per analysed tile) carrying probabilities for measurement maps.

    A generator: `write_geojson` streams them to disk, so a slide with many tiles never holds them all.
    """
    if class_probs.shape[0] != l0_xy.shape[0] or fg_mean.shape[0] != l0_xy.shape[0]:
        raise GeoJsonError(
            f"{l0_xy.shape[0]} tiles but {class_probs.shape[0]} class rows and {fg_mean.shape[0]} fg means; "
            "pass the outputs of exactly the planned tiles"
        )
    return _tile_features(
        l0_xy,
        float(l0_tile_size),
        class_probs,
        fg_mean,
        class_names,
        class_colors,
        positive_index,
        l0_offset_xy,
        seed,
    )


def _tile_features(
    l0_xy: np.ndarray,
    side: float,
    class_probs: np.ndarray,
    fg_mean: np.ndarray,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
    positive_index: int,
    l0_offset_xy: tuple[float, float],
    seed: str | None,
) -> Iterator[dict[str, Any]]:
    for i, ((x, y), probs, fg) in enumerate(zip(l0_xy.tolist(), class_probs, fg_mean, strict=True)):
        x0, y0 = x - l0_offset_xy[0], y - l0_offset_xy[1]
        top = int(np.argmax(probs))
        ring = [[x0, y0], [x0, y0 + side], [x0 + side, y0 + side], [x0 + side, y0], [x0, y0]]
        yield (
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


def feature_collection(features: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """The FeatureCollection QuPath reads, with provenance and the coordinate frame in `metadata`."""
    return {"type": "FeatureCollection", "features": features, "metadata": metadata}


def write_geojson(
    path: str | os.PathLike[str], features: Iterable[dict[str, Any]], metadata: dict[str, Any]
) -> int:
    """Stream a FeatureCollection to `path` atomically, one feature at a time; return the feature count.

    A path ending in `.gz` is gzipped (QuPath opens `.geojson.gz`), with a zero timestamp so reruns are
    byte-identical.
    """
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    count = 0
    with open(tmp, "wb") as raw:
        sink: Any = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if out.suffix == ".gz" else raw
        with io.TextIOWrapper(sink, encoding="utf-8") as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            for feature in features:
                fh.write("," if count else "")
                fh.write(json.dumps(feature, ensure_ascii=False, separators=(",", ":")))
                count += 1
            fh.write('],"metadata":' + json.dumps(metadata, ensure_ascii=False, separators=(",", ":")) + "}")
    os.replace(tmp, out)
    logger.info("GeoJSON written: %s (%d features)", out, count)
    return count
