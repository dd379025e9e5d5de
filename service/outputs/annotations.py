"""QuPath GeoJSON annotations read back in: polygons with their class name, rasterised into any window.

QuPath exports annotations as a FeatureCollection (or a bare list of features) whose geometries are Polygons or
MultiPolygons in level-0 pixel coordinates (x right, y down) and whose `properties.classification.name` says what
a shape marks ("Tumor", "Gland", ...). Other geometries (points, lines) carry no area and are skipped.

Planes: `l0_` level-0 slide pixels, `w_` pixels of a window that starts at `l0_origin_xy` and has `scale` window
pixels per level-0 pixel. A window pixel belongs to a polygon when its centre lies inside it (holes excluded);
pixels whose centre is within half a pixel of the outline may fall either way (OpenCV fills the outline too).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["AnnotatedPolygon", "AnnotationError", "class_counts", "mask_to_features", "parse_annotations",
           "rasterize", "read_annotations", "select_classes"]

_SHIFT = 4  # fractional bits of the vertices handed to cv2.fillPoly (1/16 px)


class AnnotationError(ValueError):
    """An annotation document is not a GeoJSON FeatureCollection of polygons."""


@dataclass(frozen=True)
class AnnotatedPolygon:
    """One polygon: its class name (None when unclassified) and rings in l0 pixels, exterior first."""

    name: str | None
    rings: tuple[np.ndarray, ...]  # each (N, 2) float64; rings[1:] are holes

    @property
    def l0_bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior ring."""
        ext = self.rings[0]
        return float(ext[:, 0].min()), float(ext[:, 1].min()), float(ext[:, 0].max()), float(ext[:, 1].max())

    @property
    def l0_area(self) -> float:
        """Area in l0 px², holes subtracted (shoelace)."""
        def shoelace(r: np.ndarray) -> float:
            x, y = r[:, 0], r[:, 1]
            return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
        return shoelace(self.rings[0]) - sum(shoelace(h) for h in self.rings[1:])


def _ring(coords: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: a ring must be a list of [x, y] numbers ({err})") from err
    if ring.ndim != 2 or ring.shape[1] < 2 or ring.shape[0] < 3:
        raise AnnotationError(f"{where}: a ring needs at least 3 [x, y] points, got shape {ring.shape}")
    if not np.isfinite(ring[:, :2]).all():
        raise AnnotationError(f"{where}: a ring holds a non-finite coordinate")
    return np.ascontiguousarray(ring[:, :2])


def _class_name(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict) and isinstance(cls.get("name"), str):
        return cls["name"]
    if isinstance(cls, str):
        return cls
    return None


def _feature_polygons(feature: Any, where: str) -> list[AnnotatedPolygon]:
    """The polygons of one feature (none for points and lines, which mark no area)."""
    if not isinstance(feature, dict):
        raise AnnotationError(f"{where} is not an object")
    geom = feature.get("geometry") or {}
    if not isinstance(geom, dict):
        raise AnnotationError(f"{where} has a geometry that is not an object")
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind not in ("Polygon", "MultiPolygon"):
        return []
    where = f"{where} ({kind})"
    parts = [coords] if kind == "Polygon" else coords
    if not isinstance(parts, list):
        raise AnnotationError(f"{where}: coordinates must be a list")
    name = _class_name(feature.get("properties"))
    out = []
    for part in parts:
        if not isinstance(part, list) or not part:
            raise AnnotationError(f"{where}: a polygon must be a list of rings")
        out.append(AnnotatedPolygon(name, tuple(_ring(r, where) for r in part)))
    return out


def parse_annotations(doc: Any, *, source: str = "annotations") -> list[AnnotatedPolygon]:
    """The polygons of a QuPath GeoJSON export (a FeatureCollection, or a list of Features).

    Raises AnnotationError, saying what to export instead, when the document is neither or holds no polygon.
    """
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, list):
        features = doc
    else:
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(f"{source} must be a GeoJSON FeatureCollection (QuPath: File > Export objects as "
                              f"GeoJSON, 'Export as FeatureCollection'), got {kind!r}")
    if not isinstance(features, list):
        raise AnnotationError(f"{source}: 'features' must be a list")
    polygons = [p for i, feature in enumerate(features) for p in _feature_polygons(feature, f"{source}: feature {i}")]
    if not polygons:
        raise AnnotationError(f"{source} holds no Polygon or MultiPolygon feature: export the annotations "
                              "(areas), not points or lines")
    return polygons


def read_annotations(path: str | Path) -> list[AnnotatedPolygon]:
    """`parse_annotations` of a GeoJSON file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"cannot read annotations {path}: {err}") from err
    return parse_annotations(doc, source=str(path.name))


def select_classes(polygons: Iterable[AnnotatedPolygon], names: Iterable[str]) -> list[AnnotatedPolygon]:
    """The polygons whose class is one of `names` (case-insensitive)."""
    wanted = {n.casefold() for n in names}
    return [p for p in polygons if p.name is not None and p.name.casefold() in wanted]


def class_counts(polygons: Iterable[AnnotatedPolygon]) -> dict[str, int]:
    """Polygons per class name ("" for unclassified)."""
    return dict(Counter(p.name or "" for p in polygons))


def rasterize(polygons: Sequence[AnnotatedPolygon], l0_origin_xy: tuple[float, float], scale: float,
              size_wh: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of the window: True where a window pixel's centre is inside a polygon (not in a hole)."""
    w, h = int(size_wh[0]), int(size_wh[1])
    mask = np.zeros((h, w), np.uint8)
    ox, oy = float(l0_origin_xy[0]), float(l0_origin_xy[1])
    l0_x1, l0_y1 = ox + w / scale, oy + h / scale
    for poly in polygons:
        bx0, by0, bx1, by1 = poly.l0_bbox
        if bx1 < ox or by1 < oy or bx0 > l0_x1 or by0 > l0_y1:
            continue
        # window px whose centre can be inside the polygon, clipped to the window
        x0 = max(0, int(np.floor((bx0 - ox) * scale - 0.5)))
        y0 = max(0, int(np.floor((by0 - oy) * scale - 0.5)))
        x1 = min(w, int(np.ceil((bx1 - ox) * scale + 0.5)) + 1)
        y1 = min(h, int(np.ceil((by1 - oy) * scale + 0.5)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        part = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for k, ring in enumerate(poly.rings):
            # centre of window pixel (i, j) is at l0 (ox + (i + 0.5) / scale, ...): shift so it lands on (i, j)
            uv = np.empty_like(ring)
            uv[:, 0] = (ring[:, 0] - ox) * scale - 0.5 - x0
            uv[:, 1] = (ring[:, 1] - oy) * scale - 0.5 - y0
            pts = np.round(uv * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(part, [pts], 1 if k == 0 else 0, lineType=cv2.LINE_8, shift=_SHIFT)
        mask[y0:y1, x0:x1] |= part
    return mask.astype(bool)


def mask_to_features(mask: np.ndarray, name: str, *, l0_offset_xy: tuple[float, float] = (0.0, 0.0),
                     color: tuple[int, int, int] = (0, 160, 0)) -> list[dict[str, Any]]:
    """QuPath annotation features of a (H, W) bool mask at level-0 resolution: one Polygon per connected
    component with its holes, vertices at the centres of the boundary pixels (so `rasterize` gives it back)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    features = []
    ox, oy = l0_offset_xy
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1 or len(contour) < 3:
            continue  # holes are added to their parent below; specks of < 3 points have no area
        rings = [contour]
        child = hierarchy[0][i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(contours[child])
            child = hierarchy[0][child][0]
        coords = []
        for ring in rings:
            pts = ring.reshape(-1, 2).astype(np.float64) + 0.5
            pts[:, 0] += ox
            pts[:, 1] += oy
            closed = np.vstack([pts, pts[:1]])
            coords.append([[round(float(x), 2), round(float(y), 2)] for x, y in closed])
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                         "properties": {"objectType": "annotation",
                                        "classification": {"name": name, "color": list(color)}}})
    return features
