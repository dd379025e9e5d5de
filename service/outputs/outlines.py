"""Exact cell-edge outlines of 4-connected heatmap components, traced by OpenCV (the polygon side of geojson).

Planes: `hm_` heatmap cells. Each component is traced on its own canvas (so diagonal neighbours stay separate
regions); the corner clean-up and the shapely construction then run once over every ring of every component.
"""

from __future__ import annotations

import cv2
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

__all__ = ["outlines", "traced_rings"]


def traced_rings(row: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """One component's outline and holes traced by OpenCV, in cells, before corner removal.

    The runs are drawn at twice the resolution with a one-pixel margin; OpenCV then traces the boundary pixels,
    and pixel p of that canvas maps back to cell edge p // 2: the first pixel of a cell lands on its left/top
    edge, the last on its right/bottom edge, and the diagonal steps at corners collapse onto the exact corner.
    Returns the rings (each outer ring followed by its holes, in OpenCV's order) and each ring's polygon number.
    """
    r0, c0 = int(row.min()), int(x0.min())
    canvas = np.zeros((2 * (int(row.max()) - r0 + 1) + 2, 2 * (int(x1.max()) - c0) + 2), np.uint8)
    for r, a, b in zip((row - r0).tolist(), (x0 - c0).tolist(), (x1 - c0).tolist(), strict=True):
        canvas[1 + 2 * r : 3 + 2 * r, 1 + 2 * a : 1 + 2 * b] = 1
    contours, hierarchy = cv2.findContours(canvas, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parents = hierarchy[0][:, 3].tolist()
    holes: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        if parent >= 0:
            holes.setdefault(parent, []).append(i)
    rings: list[np.ndarray] = []
    polygon_of: list[int] = []
    shells = [i for i, parent in enumerate(parents) if parent < 0]
    for number, shell in enumerate(shells):
        for i in [shell, *holes.get(shell, [])]:
            rings.append(contours[i].reshape(-1, 2) // 2 + (c0, r0))
            polygon_of.append(number)
    return rings, polygon_of


def _ring_neighbours(ring_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each point's previous and next point on its own closed ring (rings stored contiguously)."""
    n = ring_of.shape[0]
    starts = np.flatnonzero(np.diff(ring_of, prepend=-1))
    ends = np.append(starts[1:], n) - 1
    prev, nxt = np.arange(-1, n - 1), np.arange(1, n + 1)
    prev[starts], nxt[ends] = ends, starts
    return prev, nxt


def _corners(points: np.ndarray, ring_of: np.ndarray) -> np.ndarray:
    """Which points are ring vertices: not a repeat of the previous point, not in the middle of a straight edge."""
    keep = np.any(points != points[_ring_neighbours(ring_of)[0]], axis=1)
    pts, ring = points[keep], ring_of[keep]
    prev, nxt = _ring_neighbours(ring)
    before, after = pts - pts[prev], pts[nxt] - pts
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    straight = (cross == 0) & ((before * after).sum(axis=1) > 0)  # a reversal (spike tip) is kept
    keep[np.flatnonzero(keep)[straight]] = False
    return keep


def outlines(traced: list[tuple[list[np.ndarray], list[int]]]) -> list[BaseGeometry]:
    """Exact cell-edge geometries of traced components, corners found and polygons built in one vectorised pass."""
    rings = [ring for component_rings, _ in traced for ring in component_rings]
    sizes = np.array([ring.shape[0] for ring in rings])
    ring_of = np.repeat(np.arange(len(rings)), sizes)
    points = np.concatenate(rings).astype(np.float64)
    keep = _corners(points, ring_of)
    linear = shapely.linearrings(points[keep], indices=ring_of[keep])
    counts = [polys[-1] + 1 for _, polys in traced]  # polygons per component
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    polygon_id = np.concatenate([np.asarray(polys) + off for (_, polys), off in zip(traced, offsets, strict=True)])
    polygons = shapely.polygons(linear, indices=polygon_id)
    geoms: list[BaseGeometry] = []
    for start, count in zip(offsets.tolist(), counts, strict=True):
        parts = polygons[start : start + count]
        geoms.append(parts[0] if count == 1 else shapely.MultiPolygon(list(parts)))
    invalid = np.flatnonzero(~shapely.is_valid(np.array(geoms, dtype=object)))
    for i in invalid.tolist():  # a shape touching itself at a corner
        geoms[i] = shapely.make_valid(geoms[i], method="structure")
    return geoms
