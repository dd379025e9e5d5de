"""Tissue detection on a low-resolution image and the tile grid at the model's physical scale.

Planes: `l0_` level-0 pixels of the slide; `lvl_` pixels of the pyramid level tiles are read from; the tissue mask
has its own plane with `l0_per_px` level-0 pixels per mask pixel. A tile is a square of `l0_tile_size` level-0
pixels (a float: input_mpp x input_size / slide mpp) read at `level` as `lvl_tile_size` pixels and resized to the
model's input size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from service.slide.errors import SlideError
from service.slide.wsi import Slide, SlideInfo

__all__ = ["RegionPlan", "ResolutionTooLowError", "TilePlan", "TissueMask", "detect_tissue", "plan_regions",
           "plan_tiles", "tissue_from_rgb"]

logger = logging.getLogger(__name__)

MAX_UPSAMPLE = 2.0  # refuse slides whose pixels are more than this many times coarser than the model's


class ResolutionTooLowError(SlideError):
    """The slide is too coarse for the model: the model would see upsampled blur."""


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Boolean tissue mask (H, W) over the whole level-0 frame; one mask pixel = `l0_per_px` level-0 pixels."""

    mask: np.ndarray
    l0_per_px: float

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _otsu(channel: np.ndarray) -> float:
    """Otsu threshold of a uint8 image."""
    thresh, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(thresh)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than `min_px` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def tissue_from_rgb(rgb: np.ndarray, um_per_px: float, *, min_saturation: float = 15.0,
                    max_gray: float = 225.0, min_gray: float = 25.0, close_um: float = 60.0,
                    min_object_um2: float = 5_000.0, min_hole_um2: float = 10_000.0) -> np.ndarray:
    """Tissue mask of an (H, W, 3) RGB image whose pixels are `um_per_px` microns wide.

    Otsu on grayscale splits off the bright background mode; tissue is then anything clearly more saturated
    (HSV S above background + 12, at least `min_saturation`) or clearly darker (gray below background - 25, at
    most `max_gray`) than that background. Near-black scanner borders and strong green ink are not tissue. The
    mask is closed with a disc of `close_um`; components and holes below the given areas are removed / filled.
    """
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    img = cv2.medianBlur(np.ascontiguousarray(rgb), 5) if min(rgb.shape[:2]) >= 5 else rgb
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    sat = hsv[..., 1]
    background = gray >= _otsu(gray)
    bg_gray, bg_sat = 240.0, 5.0  # nominal glass, used when no glass is visible
    if background.mean() > 0.05:
        gray_b, sat_b = float(np.median(gray[background])), float(np.median(sat[background]))
        if gray_b >= 180 and sat_b <= 40:  # bright and grey: glass, not the lighter half of dense tissue
            bg_gray, bg_sat = gray_b, sat_b
    sat_t = max(min_saturation, bg_sat + 12.0)
    gray_t = min(max_gray, bg_gray - 25.0)
    mask = ((sat > sat_t) | (gray < gray_t)) & (gray >= min_gray)
    green_ink = (hsv[..., 0] >= 35) & (hsv[..., 0] <= 85) & (sat > 60)  # H&E is never green
    mask &= ~green_ink
    radius = int(round(close_um / um_per_px / 2))
    if radius >= 1:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        padded = np.pad(mask.astype(np.uint8), radius)  # pad so that closing does not glue tissue to the border
        mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disc)[radius:-radius, radius:-radius].astype(bool)
    px_area = um_per_px * um_per_px
    mask = _remove_small(mask, min_object_um2 / px_area)
    holes = _remove_small(~mask, min_hole_um2 / px_area)
    return mask | ~holes


def detect_tissue(slide: Slide, *, target_um_per_px: float = 8.0, min_long_side_px: int = 512,
                  max_long_side_px: int = 4096, **kwargs: Any) -> TissueMask:
    """Tissue mask at about `target_um_per_px`, with its long side kept within [min, max]_long_side_px.

    The upper bound keeps the mask (and the memory of detection) bounded on very large slides: a 220k px tall
    slide at 0.25 um/px gets about 13 um/px instead of 8.
    """
    info = slide.info
    l0_w, l0_h = info.l0_size_wh
    l0_per_px = target_um_per_px / info.mpp
    long_side = max(l0_w, l0_h)
    l0_per_px = min(l0_per_px, max(1.0, long_side / min_long_side_px))
    l0_per_px = max(l0_per_px, long_side / max_long_side_px)
    l0_per_px = max(l0_per_px, 1.0)
    out_wh = (max(1, math.ceil(l0_w / l0_per_px)), max(1, math.ceil(l0_h / l0_per_px)))
    rgb = slide.read_scaled(out_wh, (out_wh[0] * l0_per_px, out_wh[1] * l0_per_px))  # white past the edge
    um_per_px = l0_per_px * info.mpp
    mask = tissue_from_rgb(rgb, um_per_px, **kwargs)
    logger.info("tissue on %s: %d x %d mask at %.2f um/px, %.1f %% tissue", info.name, out_wh[0], out_wh[1],
                um_per_px, 100 * mask.mean())
    return TissueMask(mask=mask, l0_per_px=float(l0_per_px))


@dataclass(frozen=True, eq=False)
class TilePlan:
    """The kept tiles of one slide, row-major, at the model's physical scale."""

    l0_xy: np.ndarray  # (N, 2) int64 top-left corners
    t_grid_xy: np.ndarray  # (N, 2) int64 column and row of each tile in the full grid
    tissue_fraction: np.ndarray  # (N,) float32
    l0_tile_size: float
    l0_stride: float
    level: int
    level_downsample: float
    lvl_tile_size: int
    input_size: int
    input_mpp: float
    slide_mpp: float
    grid_size_wh: tuple[int, int]
    l0_origin_xy: tuple[int, int]
    min_tissue: float
    overlap: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.l0_xy.shape[0])

    def take(self, order: np.ndarray) -> TilePlan:
        """The same plan with its tiles in `order` (a permutation of the tile indices)."""
        order = np.asarray(order, np.int64)
        return dataclasses.replace(self, l0_xy=self.l0_xy[order], t_grid_xy=self.t_grid_xy[order],
                                   tissue_fraction=self.tissue_fraction[order])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {
            "l0_xy": self.l0_xy.tolist(), "t_grid_xy": self.t_grid_xy.tolist(),
            "tissue_fraction": [round(float(f), 6) for f in self.tissue_fraction],
            "l0_tile_size": self.l0_tile_size, "l0_stride": self.l0_stride, "level": self.level,
            "level_downsample": self.level_downsample, "lvl_tile_size": self.lvl_tile_size,
            "input_size": self.input_size, "input_mpp": self.input_mpp, "slide_mpp": self.slide_mpp,
            "grid_size_wh": list(self.grid_size_wh), "l0_origin_xy": list(self.l0_origin_xy),
            "min_tissue": self.min_tissue, "overlap": self.overlap, "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilePlan:
        """Inverse of `to_dict`."""
        return cls(
            l0_xy=np.asarray(data["l0_xy"], np.int64).reshape(-1, 2),
            t_grid_xy=np.asarray(data["t_grid_xy"], np.int64).reshape(-1, 2),
            tissue_fraction=np.asarray(data["tissue_fraction"], np.float32),
            l0_tile_size=float(data["l0_tile_size"]), l0_stride=float(data["l0_stride"]),
            level=int(data["level"]), level_downsample=float(data["level_downsample"]),
            lvl_tile_size=int(data["lvl_tile_size"]), input_size=int(data["input_size"]),
            input_mpp=float(data["input_mpp"]), slide_mpp=float(data["slide_mpp"]),
            grid_size_wh=(int(data["grid_size_wh"][0]), int(data["grid_size_wh"][1])),
            l0_origin_xy=(int(data["l0_origin_xy"][0]), int(data["l0_origin_xy"][1])),
            min_tissue=float(data["min_tissue"]), overlap=float(data["overlap"]),
            extra=dict(data.get("extra", {})),
        )


def _grid_count(extent: int, tile: float, stride: float) -> int:
    """Tiles needed so that the last one reaches the end of `extent`."""
    if extent <= tile:
        return 1
    return int(math.ceil((extent - tile) / stride - 1e-9)) + 1


def _tile_fractions(tissue: TissueMask, l0_x: np.ndarray, l0_y: np.ndarray, l0_size: float) -> np.ndarray:
    """Tissue fraction of each tile: mask pixels [round(l0 / s), round((l0 + size) / s)), outside = no tissue."""
    mask = tissue.mask
    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)  # (h + 1, w + 1), zero first row/col
    s = tissue.l0_per_px
    x0 = np.round(l0_x / s).astype(np.int64)
    y0 = np.round(l0_y / s).astype(np.int64)
    x1 = np.maximum(np.round((l0_x + l0_size) / s).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((l0_y + l0_size) / s).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return (inside / area).astype(np.float32)


def _read_size(lvl_exact: float, input_size: int) -> int:
    """Pixels to read at the level: rounded, or snapped to k x input_size when within 1 % of it.

    An exact integer ratio lets the resize take OpenCV's fast area path (449 -> 224 costs about 20x more than
    448 -> 224); 1 % is well inside scanner MPP calibration error.
    """
    k = round(lvl_exact / input_size)
    if k >= 1 and abs(lvl_exact - k * input_size) <= 0.01 * lvl_exact:
        return int(k * input_size)
    return max(1, int(round(lvl_exact)))


def plan_tiles(info: SlideInfo, tissue: TissueMask, input_mpp: float, input_size: int, min_tissue: float = 0.1,
               overlap: float = 0.0) -> TilePlan:
    """Grid of tiles at `input_mpp` x `input_size` microns over the slide (or its bounds), kept by tissue."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}; 0.5 means half-tile steps")
    if input_size <= 0 or input_mpp <= 0:
        raise ValueError(f"input_size and input_mpp must be positive, got {input_size} and {input_mpp}")
    needed_ds = input_mpp / info.mpp
    if needed_ds < 1.0 / MAX_UPSAMPLE:
        raise ResolutionTooLowError(
            f"{info.name!r} has {info.mpp:.3g} um/px, more than {MAX_UPSAMPLE:g}x coarser than the model's "
            f"{input_mpp:g} um/px: the model would see upsampled blur. Use a scan at {input_mpp:g} um/px or finer "
            f"(or, if the slide's MPP metadata is wrong, pass the correct value with --mpp / `mpp`)")
    l0_tile = input_mpp * input_size / info.mpp
    stride = l0_tile * (1.0 - overlap)
    level = info.best_level_for_downsample(needed_ds)
    level_ds = info.level_downsamples[level]
    lvl_tile = _read_size(l0_tile / level_ds, input_size)
    ox, oy, region_w, region_h = info.bounds or (0, 0, *info.l0_size_wh)
    n_x, n_y = _grid_count(region_w, l0_tile, stride), _grid_count(region_h, l0_tile, stride)
    gy, gx = np.mgrid[0:n_y, 0:n_x]
    gx, gy = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
    # Corners sit on the lattice of input pixels (level_ds x k level-0 px when the read is k x input_size), so
    # level reads need no sub-pixel offset and JPEG tiles can be DCT-downscaled exactly; the shift is < 1 input px.
    k = lvl_tile // input_size if lvl_tile % input_size == 0 else 1
    l0_align = level_ds * k
    l0_x = np.round(np.round((ox + gx * stride) / l0_align) * l0_align).astype(np.int64)
    l0_y = np.round(np.round((oy + gy * stride) / l0_align) * l0_align).astype(np.int64)
    fractions = _tile_fractions(tissue, l0_x, l0_y, l0_tile)
    keep = fractions >= min_tissue
    logger.info("plan for %s: %d of %d tiles kept (tile %.1f l0 px, level %d, read %d px)", info.name,
                int(keep.sum()), keep.size, l0_tile, level, lvl_tile)
    return TilePlan(
        l0_xy=np.stack([l0_x[keep], l0_y[keep]], axis=1), t_grid_xy=np.stack([gx[keep], gy[keep]], axis=1),
        tissue_fraction=fractions[keep], l0_tile_size=float(l0_tile), l0_stride=float(stride), level=level,
        level_downsample=float(level_ds), lvl_tile_size=lvl_tile, input_size=int(input_size),
        input_mpp=float(input_mpp), slide_mpp=float(info.mpp), grid_size_wh=(n_x, n_y),
        l0_origin_xy=(int(ox), int(oy)), min_tissue=float(min_tissue), overlap=float(overlap),
        extra={"l0_align": float(l0_align)},
    )


@dataclass(frozen=True, eq=False)
class RegionPlan:
    """Rectangles of at most `tiles_per_side` x `tiles_per_side` grid tiles, each run as one model input with a
    `halo_in` margin of context on every side.

    Regions are laid over the tissue: the kept tiles of each band of `tiles_per_side` grid rows are cut into runs
    of neighbouring columns (at most `tiles_per_side` wide), trimmed to the rows they use. A region's core covers
    its grid tiles edge to edge; the halo is context only, never written. `reads` is a TilePlan whose "tiles"
    are squares of the largest region size anchored at each region's halo corner, so the tile reader reads them as
    it reads tiles; `crop_in_wh` is the part of each square the model runs on. Planes: `t_` tile indices of the
    plan the regions were made from, `r_` region indices, `in_` model-input pixels of a region (its core starts
    at `halo_in`).
    """

    reads: TilePlan
    tiles_per_side: int
    halo_in: int
    r_tiles_wh: np.ndarray  # (M, 2) each region's core in grid tiles (columns, rows)
    t_order: np.ndarray  # (N,) the tile plan's indices in region-major order
    t_region: np.ndarray  # (N,) in that order: the region of each tile (non-decreasing)
    t_cell_xy: np.ndarray  # (N, 2) in that order: the tile's column and row inside its region's core

    def __len__(self) -> int:
        return len(self.reads)

    @property
    def region_input_size(self) -> int:
        """Side of the squares read, at the model's input scale: the largest core plus a halo on each side."""
        return int(self.reads.input_size)

    def crop_in_wh(self, r: int) -> tuple[int, int]:
        """Width and height (model-input px) of region `r`'s input: its core plus a halo on each side."""
        s = self.reads.extra["regions"]["tile_input_size"]
        w, h = (int(v) for v in self.r_tiles_wh[r])
        return w * s + 2 * self.halo_in, h * s + 2 * self.halo_in

    def tile_ranges(self) -> list[range]:
        """For each region, its tiles' indices in region-major order (contiguous ranges)."""
        bounds = np.searchsorted(self.t_region, np.arange(len(self) + 1))
        return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def input_pixels(self) -> int:
        """Model-input pixels of every region together (what the model computes, halos included)."""
        return int(sum(w * h for w, h in (self.crop_in_wh(r) for r in range(len(self)))))


def _tissue_rectangles(gx: np.ndarray, gy: np.ndarray, r: int) -> list[tuple[int, int, int, int]]:
    """(column, row, width, height) in grid tiles of rectangles covering every kept tile, in band order."""
    out: list[tuple[int, int, int, int]] = []
    for band in np.unique(gy // r):
        in_band = gy // r == band
        cols = np.unique(gx[in_band])
        runs: list[tuple[int, int]] = []
        start = prev = int(cols[0])
        for c in (int(v) for v in cols[1:]):
            if c != prev + 1 or c - start + 1 > r:  # a gap, or the run is as wide as a region may be
                runs.append((start, prev))
                start = c
            prev = c
        runs.append((start, prev))
        for c0, c1 in runs:
            rows = gy[in_band & (gx >= c0) & (gx <= c1)]
            out.append((c0, int(rows.min()), c1 - c0 + 1, int(rows.max() - rows.min() + 1)))
    return out


def plan_regions(plan: TilePlan, tiles_per_side: int, halo_in: int) -> RegionPlan:
    """Group the kept tiles of a no-overlap plan into tissue rectangles of at most `tiles_per_side`^2 tiles.

    Tiles inside a rectangle that were not kept (too little tissue) are computed as context but give no output.
    The reading square of a region starts `halo_in` input pixels before its first grid tile's corner (on the same
    lattice as the tiles), so JPEG tiles keep their exact DCT-scaled decoding.
    """
    if plan.overlap != 0.0:
        raise ValueError(f"regions need a no-overlap tile plan (tiles edge to edge), got overlap {plan.overlap}")
    if tiles_per_side < 1 or halo_in < 0:
        raise ValueError(f"tiles_per_side must be >= 1 and halo_in >= 0, got {tiles_per_side} and {halo_in}")
    r = tiles_per_side
    gx, gy = plan.t_grid_xy[:, 0], plan.t_grid_xy[:, 1]
    rects = _tissue_rectangles(gx, gy, r) if len(plan) else []
    region_of = np.full(len(plan), -1, np.int64)
    for k, (c0, r0, w, h) in enumerate(rects):
        inside = (gx >= c0) & (gx < c0 + w) & (gy >= r0) & (gy < r0 + h) & (gy // r == r0 // r)
        region_of[inside] = k
    order = np.lexsort((gx, gy, region_of))  # region-major, then row-major inside a region
    t_region = region_of[order]
    c0s = np.array([c for c, _, _, _ in rects], np.int64)
    r0s = np.array([row for _, row, _, _ in rects], np.int64)
    t_cell_xy = np.stack([gx[order] - c0s[t_region], gy[order] - r0s[t_region]], axis=1).astype(np.int64) \
        if len(plan) else np.zeros((0, 2), np.int64)
    halo_lvl = int(round(halo_in * plan.lvl_tile_size / plan.input_size))
    align = float(plan.extra.get("l0_align", plan.level_downsample))
    ox, oy = plan.l0_origin_xy
    # the region's first grid tile corner, computed exactly as plan_tiles computes tile corners
    l0_x = np.round(np.round((ox + c0s * plan.l0_stride) / align) * align)
    l0_y = np.round(np.round((oy + r0s * plan.l0_stride) / align) * align)
    halo_l0 = halo_lvl * plan.level_downsample
    side = max([max(w, h) for _, _, w, h in rects], default=1)  # squares as large as the largest region
    reads = dataclasses.replace(
        plan,
        l0_xy=np.stack([l0_x - halo_l0, l0_y - halo_l0], axis=1).round().astype(np.int64).reshape(-1, 2),
        t_grid_xy=np.stack([c0s, r0s], axis=1).reshape(-1, 2),
        tissue_fraction=np.ones(len(rects), np.float32),
        l0_tile_size=float(side * plan.l0_stride + 2 * halo_l0),
        l0_stride=float(plan.l0_stride),
        lvl_tile_size=int(side * plan.lvl_tile_size + 2 * halo_lvl),
        input_size=int(side * plan.input_size + 2 * halo_in),
        extra={**plan.extra, "regions": {"tiles_per_side": r, "halo_in": int(halo_in),
                                         "tile_input_size": int(plan.input_size)}},
    )
    r_tiles_wh = np.array([(w, h) for _, _, w, h in rects], np.int64).reshape(-1, 2)
    return RegionPlan(reads, r, int(halo_in), r_tiles_wh, order.astype(np.int64), t_region.astype(np.int64),
                      t_cell_xy)
