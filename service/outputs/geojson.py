"""Heatmap -> positive regions -> QuPath GeoJSON (FeatureCollection of annotations, optional tile detections).

Planes: `hm_` heatmap cells (`l0 = hm * hm_downsample`) and `l0_` level-0 slide pixels. Output coordinates are
level-0 pixels, origin top-left, y down, minus the slide's bounds offset when it has one (MRXS and other
formats whose `openslide.bounds-*` QuPath crops to), which is the frame QuPath uses; the collection's
`metadata.frame` says which offset was applied.

Regions are polygonised from each heatmap row's runs of positive cells: runs are grouped into 4-connected
components band by band (`RegionGrouper`, which keeps only the regions still open at the band's last row), and
OpenCV traces each finished component's outline and holes on a doubled grid whose pixels map back to exact cell
edges (see `service.outputs.outlines`), before shapely checks validity and simplifies. Features are built and written
a batch of regions at a time, so neither the grouping nor the GeoJSON holds whole-slide Python objects.
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
from typing import Any, Protocol

import cv2
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from service.outputs.outlines import outlines, traced_rings
from service.outputs.stitching import HeatmapBand

__all__ = [
    "AREA_KEY",
    "GeoJsonError",
    "Region",
    "RegionGrouper",
    "RunTable",
    "collect_runs",
    "feature_collection",
    "find_regions",
    "iter_region_features",
    "region_features",
    "runs_of_band",
    "tile_features",
    "write_geojson",
]

logger = logging.getLogger(__name__)

AREA_KEY = "Area µm^2"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pixelcam/pixelcam/geojson")
COORD_DECIMALS = 2
GROUP_ROWS = 256  # heatmap rows per block when `find_regions` groups a whole run table
FEATURE_POINTS = 1 << 14  # outline points per batch of features (the shapely work is vectorised per batch)


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

    def take(self, index: np.ndarray | slice) -> RunTable:
        """The runs at `index` (an index array or boolean mask, in that order; a slice gives views)."""
        return RunTable(*(getattr(self, f)[index] for f in RunTable.__annotations__))

    def copy(self) -> RunTable:
        """A copy owning its arrays (a slice's views would keep the whole table alive)."""
        return RunTable(*(getattr(self, f).copy() for f in RunTable.__annotations__))


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
    step = np.diff(positive.astype(np.int8), axis=1, prepend=0, append=0)
    rows, x0 = np.nonzero(step == 1)
    _, x1 = np.nonzero(step == -1)
    if rows.size == 0:
        return RunTable.concat([])
    # the positive cells in row-major order are the runs back to back: reduce each run's slice of them
    cells = band.prob[positive].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(x1 - x0)[:-1]])
    sums = np.add.reduceat(cells, starts)
    maxes = np.maximum.reduceat(cells, starts)
    return RunTable(rows.astype(np.int64) + band.hm_y0, x0.astype(np.int64), x1.astype(np.int64), sums, maxes)


class RunSink(Protocol):
    """Where `collect_runs` puts each band's runs: a list, or a `RegionGrouper` that groups them as they come."""

    def append(self, runs: RunTable, /) -> None: ...


def collect_runs(bands: Iterable[HeatmapBand], threshold: float, sink: RunSink) -> Iterator[HeatmapBand]:
    """Pass bands through unchanged while appending their positive runs to `sink` (one pass, two consumers)."""
    for band in bands:
        sink.append(runs_of_band(band, threshold))
        yield band


class _Merges:
    """Union-find over the ids of open regions, for the few merges one band causes (roots are the smaller ids)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def root(self, i: int) -> int:
        while (p := self.parent.get(i, i)) != i:
            i = p
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            ra, rb = min(ra, rb), max(ra, rb)
            self.parent[rb] = ra
        return ra


class RegionGrouper:
    """Groups runs into 4-connected regions band by band, holding only the regions still open.

    Feed it the run tables of successive bands with `append` (top to bottom: every row of a table below the
    previous table's rows, and each row's runs in one table, sorted by x). Runs are connected when they lie on
    adjacent rows and overlap in x; each table is labelled with OpenCV on a canvas of its rows plus the previous
    table's last row, whose runs carry the ids of the regions open there. A region that no run of the newest
    last row belongs to is finished at once: dropped when smaller than `min_cells`, else traced into its exact
    outline, so memory holds the open regions' runs and the finished outlines, never the slide's run table.
    `regions()` then gives the same list, in the same order, as grouping the whole table at once.
    """

    def __init__(self, min_cells: int = 1) -> None:
        self.min_cells = min_cells
        self._open: dict[int, list[RunTable]] = {}  # open region id -> its runs, one table per band
        self._cells: dict[int, int] = {}  # open region id -> its cells so far
        self._front = RunTable.concat([])  # the runs on the last row seen...
        self._front_ids = np.zeros(0, np.int64)  # ...and the open region each belongs to
        self._last_row = -1
        self._next_id = 0
        # (sort key, region): the key is the final order's, then the first run's (row, x0) for exact ties
        self._done: list[tuple[tuple[Any, ...], Region]] = []

    def append(self, runs: RunTable) -> None:
        """Group one band's runs; finish the regions it does not continue."""
        if len(runs) == 0:
            self._finish(list(self._open))
            self._front, self._front_ids = runs, np.zeros(0, np.int64)
            return
        row = runs.hm_row
        first, last = int(row[0]), int(row[-1])
        if first <= self._last_row:
            raise GeoJsonError(
                f"runs of row {first} came after row {self._last_row}; feed bands top to bottom"
            )
        joined = len(self._front) > 0 and first == self._last_row + 1
        front = self._front if joined else RunTable.concat([])
        top = self._last_row if joined else first
        labels = _label_runs(
            np.concatenate([front.hm_row, row]) - top,
            np.concatenate([front.hm_x0, runs.hm_x0]),
            np.concatenate([front.hm_x1, runs.hm_x1]),
            last - top + 1,
        )
        front_labels, run_labels = labels[: len(front)], labels[len(front) :]
        n_old = self._next_id
        ids = self._region_ids(front_labels, self._front_ids[: len(front)], run_labels)
        run_ids = ids[run_labels]
        order = np.argsort(run_ids, kind="stable")  # (row, x0) order kept within each region
        grouped = runs.take(order)
        starts = np.flatnonzero(np.diff(run_ids[order], prepend=-1))
        ends = np.append(starts[1:], len(order))
        region_ids = run_ids[order][starts]
        cells = np.add.reduceat(grouped.hm_x1 - grouped.hm_x0, starts)
        on_last = row == last
        open_now = np.isin(region_ids, run_ids[on_last])
        # a region that starts and ends in this band and is too small is never stored
        skip = (region_ids >= n_old) & ~open_now & (cells < self.min_cells)
        for i in np.flatnonzero(~skip).tolist():
            region = int(region_ids[i])
            part = grouped.take(slice(int(starts[i]), int(ends[i])))
            self._open.setdefault(region, []).append(part if not open_now[i] else part.copy())
            self._cells[region] = self._cells.get(region, 0) + int(cells[i])
        self._front, self._front_ids = runs.take(on_last), run_ids[on_last]
        self._last_row = last
        still_open = set(region_ids[open_now].tolist())
        self._finish([i for i in self._open if i not in still_open])

    def _region_ids(
        self, front_labels: np.ndarray, front_ids: np.ndarray, run_labels: np.ndarray
    ) -> np.ndarray:
        """The region id of each OpenCV label: the open region(s) it continues (merged), else a new one."""
        n_labels = int(max(front_labels.max(initial=0), run_labels.max(initial=0))) + 1
        merges = _Merges()
        of_label = np.full(n_labels, -1, np.int64)
        for label, region in zip(front_labels.tolist(), front_ids.tolist(), strict=True):
            of_label[label] = region if of_label[label] < 0 else merges.union(int(of_label[label]), region)
        for old in list(merges.parent):  # a U-shape closing below: move the arms' runs into one region
            root = merges.root(old)
            self._open[root].extend(self._open.pop(old))
            self._cells[root] += self._cells.pop(old)
        for label in np.flatnonzero(of_label >= 0).tolist():
            of_label[label] = merges.root(int(of_label[label]))
        fresh = np.flatnonzero(of_label < 0)
        of_label[fresh] = np.arange(self._next_id, self._next_id + fresh.size)
        self._next_id += int(fresh.size)
        return of_label

    def _finish(self, ids: list[int]) -> None:
        """Trace the finished regions of at least `min_cells` cells (one vectorised `outlines` call)."""
        kept: list[tuple[RunTable, int]] = []
        traced = []
        for i in ids:
            parts, cells = self._open.pop(i), self._cells.pop(i)
            if cells < self.min_cells:
                continue
            runs = parts[0]
            if len(parts) > 1:  # back to (row, x0) order: merged arms interleave rows
                runs = RunTable.concat(parts)
                runs = runs.take(np.lexsort((runs.hm_x0, runs.hm_row)))
            kept.append((runs, cells))
            traced.append(traced_rings(runs.hm_row, runs.hm_x0, runs.hm_x1))
        if not kept:
            return
        for (runs, cells), outline in zip(kept, outlines(traced), strict=True):
            region = Region(
                hm_polygon=outline,
                cells=cells,
                mean_prob=float(runs.prob_sum.sum() / cells),
                max_prob=float(runs.prob_max.max()),
            )
            self._done.append(((-cells, region.hm_bounds, int(runs.hm_row[0]), int(runs.hm_x0[0])), region))

    @property
    def open_regions(self) -> int:
        """How many regions are open: only these have their runs held."""
        return len(self._open)

    def regions(self) -> list[Region]:
        """Finish the regions still open and return all of them, largest first (then by bounds)."""
        self._finish(list(self._open))
        self._front, self._front_ids = RunTable.concat([]), np.zeros(0, np.int64)
        self._done.sort(key=lambda item: item[0])
        return [region for _, region in self._done]


def _label_runs(row: np.ndarray, x0: np.ndarray, x1: np.ndarray, height: int) -> np.ndarray:
    """OpenCV's 4-connected component label of each run (rows counted from 0), drawn on a `height`-row canvas."""
    width = int(x1.max()) + 1
    edges = np.zeros(height * width, np.int8)
    np.add.at(edges, row * width + x0, 1)
    np.add.at(edges, row * width + x1, -1)
    canvas = np.cumsum(edges.reshape(height, width), axis=1, dtype=np.int8).view(
        np.uint8
    )  # 0/1: disjoint runs
    _, labels = cv2.connectedComponents(canvas, connectivity=4, ltype=cv2.CV_32S)
    label_of_run: np.ndarray = labels[row, x0]
    return label_of_run


def find_regions(runs: RunTable, *, min_cells: int = 1) -> list[Region]:
    """Group the runs into 4-connected regions with holes; drop regions smaller than `min_cells`.

    The whole-table form of `RegionGrouper` (fed `GROUP_ROWS` rows at a time); regions come largest first.
    """
    grouper = RegionGrouper(min_cells)
    if len(runs):
        runs = runs.take(np.lexsort((runs.hm_x0, runs.hm_row)))
        block = runs.hm_row // GROUP_ROWS
        for part in np.split(np.arange(len(runs)), np.flatnonzero(np.diff(block)) + 1):
            grouper.append(runs.take(part))
    return grouper.regions()


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
    kinds = [
        "MultiPolygon" if t == shapely.GeometryType.MULTIPOLYGON else "Polygon"
        for t in shapely.get_type_id(rounded).tolist()
    ]
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


def region_features(regions: Sequence[Region], **kwargs: Any) -> list[dict[str, Any]]:
    """QuPath annotations, one per region, as a list: `iter_region_features` (same arguments) collected."""
    return list(iter_region_features(regions, **kwargs))


def iter_region_features(
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
    batch_points: int = FEATURE_POINTS,
) -> Iterator[dict[str, Any]]:
    """`region_features` as a generator, a batch of regions at a time, so `write_geojson` never holds them all.

    A batch holds regions of about `batch_points` outline points in all (at least one region): the largest
    regions come first and hold most of the points, so a count of regions would not bound the batch. Region i
    is named and numbered by its place in `regions` whatever the batches, so the output does not depend on
    them. The shapely work runs on a whole batch at once (simplify, scale, orient, round); only the rare regions
    that cross the slide's edge or turn invalid are handled one by one.
    """
    points = np.cumsum(shapely.get_num_coordinates(np.array([r.hm_polygon for r in regions], dtype=object)))
    start = 0
    while start < len(regions):
        done = int(points[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(points, done + batch_points, side="right")))
        yield from _region_batch(
            regions[start:stop],
            start,
            hm_downsample=float(hm_downsample),
            l0_size_wh=l0_size_wh,
            l0_mpp=l0_mpp,
            name=name,
            color=[int(c) for c in color],
            l0_offset_xy=l0_offset_xy,
            simplify_hm=simplify_hm,
            seed=seed,
        )
        start = stop


def _region_batch(
    regions: Sequence[Region],
    first: int,
    *,
    hm_downsample: float,
    l0_size_wh: tuple[int, int],
    l0_mpp: float,
    name: str,
    color: list[int],
    l0_offset_xy: tuple[float, float],
    simplify_hm: float,
    seed: str | None,
) -> list[dict[str, Any]]:
    """The features of `regions`, the first of which is region number `first` (0-based) of the slide."""
    l0_clip = shapely.box(0, 0, *l0_size_wh)
    hm = np.array([r.hm_polygon for r in regions], dtype=object)
    simple = shapely.simplify(hm, simplify_hm, preserve_topology=True)
    for i in np.flatnonzero(~shapely.is_valid(simple)).tolist():
        simple[i] = shapely.make_valid(simple[i], method="structure")
    hm_bounds = shapely.bounds(hm)
    crosses = (hm_bounds[:, 2] * hm_downsample > l0_size_wh[0]) | (
        hm_bounds[:, 3] * hm_downsample > l0_size_wh[1]
    )
    geoms = _to_l0(simple, hm_downsample, l0_offset_xy, None)
    l0_area = np.array([r.cells for r in regions], np.float64) * hm_downsample**2  # exact: cell edges
    kept = []
    for i in range(len(regions)):
        if crosses[i]:
            l0_area[i] = _to_l0(regions[i].hm_polygon, hm_downsample, (0.0, 0.0), l0_clip).area
            geoms[i] = _to_l0(simple[i], hm_downsample, l0_offset_xy, l0_clip)
        geom = geoms[i]
        if geom.is_empty or not isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
            geoms[i] = shapely.union_all(
                [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)]
            )
            if geoms[i].is_empty:
                continue
        kept.append(i)
    geometries = _geometries(geoms[kept]) if kept else []
    return [
        {
            "type": "Feature",
            "id": _feature_id(seed, "region", first + i),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "name": f"{name} {first + i + 1}",
                "classification": {"name": name, "color": list(color)},
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
    l0_size_wh: tuple[float, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """QuPath tile objects (one square per analysed tile) carrying probabilities for measurement maps.

    With `l0_size_wh`, a tile that runs past the slide's right or bottom edge is cut at it (the model saw
    padding there, not slide).

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
        l0_size_wh,
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
    l0_size_wh: tuple[float, float] | None,
) -> Iterator[dict[str, Any]]:
    right, bottom = l0_size_wh if l0_size_wh is not None else (np.inf, np.inf)
    for i, ((x, y), probs, fg) in enumerate(zip(l0_xy.tolist(), class_probs, fg_mean, strict=True)):
        x0, y0 = max(x, 0.0) - l0_offset_xy[0], max(y, 0.0) - l0_offset_xy[1]
        x1, y1 = min(x + side, right) - l0_offset_xy[0], min(y + side, bottom) - l0_offset_xy[1]
        top = int(np.argmax(probs))
        ring = [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]
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
