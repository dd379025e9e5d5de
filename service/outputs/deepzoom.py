"""Deep Zoom (DZI) geometry, descriptors and tile rendering for slides and heatmap overlays.

Planes: `l0_` level-0 slide pixels (the GeoJSON frame), `lvl_` pixels of one slide pyramid level, `dz_` pixels of
one Deep Zoom level, `t_` tile indices, `hm_` heatmap cells (`l0 = hm * hm_downsample`) and `hml_` cells of one
heatmap pyramid level. The overlay uses the SLIDE's geometry so both layers register exactly.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
import tifffile

from service.outputs.stitching import decode_heatmap

logger = logging.getLogger(__name__)

__all__ = [
    "COLORMAPS",
    "DZI_NAMESPACE",
    "ArrayHeatmap",
    "DeepZoomError",
    "DeepZoomGeometry",
    "HeatmapSource",
    "SlideTileSource",
    "TileOutOfRangeError",
    "TiffHeatmap",
    "TileRegion",
    "UnknownColormapError",
    "best_level_for_downsample",
    "colorize",
    "colormap_lut",
    "dzi_xml",
    "encode_tile",
    "render_overlay_tile",
    "render_slide_tile",
    "sample_overlay",
]

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"
TileFormat = Literal["jpeg", "png"]

# cv2's built-in maps are sampled once into 256-entry RGB tables; "gray" is the identity ramp.
_CV2_COLORMAPS = {
    "jet": cv2.COLORMAP_JET,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "turbo": cv2.COLORMAP_TURBO,
}
COLORMAPS: tuple[str, ...] = (*_CV2_COLORMAPS, "gray")


class DeepZoomError(Exception):
    """Base class of Deep Zoom errors."""


class TileOutOfRangeError(DeepZoomError, LookupError):
    """The requested level or tile does not exist in this pyramid."""


class UnknownColormapError(DeepZoomError, ValueError):
    """The requested colour map is not one of `COLORMAPS`."""


@dataclass(frozen=True)
class TileRegion:
    """Where one Deep Zoom tile lies: its level-0 rectangle and its output size in pixels."""

    dz_level: int
    dz_xy: tuple[int, int]  # top-left in the DZ level's pixels, overlap included
    dz_size_wh: tuple[int, int]  # the encoded tile's size
    l0_xy: tuple[int, int]
    l0_size_wh: tuple[int, int]
    downsample: int  # level-0 pixels per DZ pixel


class DeepZoomGeometry:
    """The DZI pyramid of an image of `l0_size_wh`: levels, level sizes, tile grids and tile rectangles."""

    def __init__(self, l0_size_wh: tuple[int, int], tile_size: int = 254, overlap: int = 1) -> None:
        l0_w, l0_h = (int(v) for v in l0_size_wh)
        if l0_w < 1 or l0_h < 1:
            raise DeepZoomError(f"image size must be positive, got {l0_size_wh}; check the slide's level-0 size")
        if tile_size < 1 or overlap < 0:
            raise DeepZoomError(f"tile_size must be >= 1 and overlap >= 0, got {tile_size} and {overlap}")
        self.l0_size_wh = (l0_w, l0_h)
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        # Top level L = ceil(log2(max(W, H))); exact in integers (bit_length avoids float log rounding).
        self.max_level = (max(l0_w, l0_h) - 1).bit_length()
        self.level_count = self.max_level + 1

    def _check_level(self, dz_level: int) -> None:
        if not 0 <= dz_level <= self.max_level:
            raise TileOutOfRangeError(f"Deep Zoom level {dz_level} does not exist; levels are 0..{self.max_level}")

    def downsample(self, dz_level: int) -> int:
        """Level-0 pixels per pixel of `dz_level` (a power of two)."""
        self._check_level(dz_level)
        return 1 << (self.max_level - dz_level)

    def level_size_wh(self, dz_level: int) -> tuple[int, int]:
        """Size of `dz_level`: level 0 halved with ceil, L - level times (= ceil(W / 2^k))."""
        d = self.downsample(dz_level)
        return (-(-self.l0_size_wh[0] // d), -(-self.l0_size_wh[1] // d))

    @property
    def level_sizes_wh(self) -> list[tuple[int, int]]:
        """Sizes of all levels, level 0 (1x1) first."""
        return [self.level_size_wh(z) for z in range(self.level_count)]

    def tile_grid_wh(self, dz_level: int) -> tuple[int, int]:
        """Number of tile columns and rows at `dz_level`."""
        dz_w, dz_h = self.level_size_wh(dz_level)
        return (-(-dz_w // self.tile_size), -(-dz_h // self.tile_size))

    def _axis(self, t_index: int, t_count: int, dz_extent: int) -> tuple[int, int]:
        """Start and length along one axis: overlap added on interior edges only."""
        dz_start = t_index * self.tile_size
        dz_end = min(dz_start + self.tile_size, dz_extent)
        if t_index > 0:
            dz_start -= self.overlap
        if t_index < t_count - 1:
            dz_end = min(dz_end + self.overlap, dz_extent)
        return dz_start, dz_end - dz_start

    def tile_region(self, dz_level: int, t_col: int, t_row: int) -> TileRegion:
        """The level-0 rectangle and output size of tile (`t_col`, `t_row`) at `dz_level`."""
        cols, rows = self.tile_grid_wh(dz_level)
        if not (0 <= t_col < cols and 0 <= t_row < rows):
            raise TileOutOfRangeError(
                f"tile {t_col}_{t_row} is outside level {dz_level}, whose grid is {cols} x {rows} tiles"
            )
        dz_w, dz_h = self.level_size_wh(dz_level)
        dz_x, out_w = self._axis(t_col, cols, dz_w)
        dz_y, out_h = self._axis(t_row, rows, dz_h)
        d = self.downsample(dz_level)
        l0_x, l0_y = dz_x * d, dz_y * d
        l0_w = min((dz_x + out_w) * d, self.l0_size_wh[0]) - l0_x
        l0_h = min((dz_y + out_h) * d, self.l0_size_wh[1]) - l0_y
        return TileRegion(dz_level, (dz_x, dz_y), (out_w, out_h), (l0_x, l0_y), (l0_w, l0_h), d)


def dzi_xml(l0_size_wh: tuple[int, int], tile_size: int = 254, overlap: int = 1, fmt: str = "jpeg") -> str:
    """The `.dzi` descriptor (XML) OpenSeadragon reads."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Image xmlns={quoteattr(DZI_NAMESPACE)} TileSize={quoteattr(str(int(tile_size)))} "
        f"Overlap={quoteattr(str(int(overlap)))} Format={quoteattr(fmt)}>"
        f"<Size Width={quoteattr(str(int(l0_size_wh[0])))} Height={quoteattr(str(int(l0_size_wh[1])))}/>"
        "</Image>\n"
    )


class _SlideInfoLike(Protocol):
    @property
    def l0_size_wh(self) -> tuple[int, int]: ...

    @property
    def level_downsamples(self) -> Sequence[float]: ...


class SlideTileSource(Protocol):
    """What slide tile rendering needs: `service.slide.wsi.Slide` satisfies it."""

    @property
    def info(self) -> _SlideInfoLike: ...

    def read_region(self, l0_xy: tuple[int, int], level: int, lvl_size_wh: tuple[int, int]) -> np.ndarray: ...


def best_level_for_downsample(level_downsamples: Sequence[float], downsample: float) -> int:
    """Index of the coarsest pyramid level whose downsample is <= `downsample` (never upsample from coarser)."""
    best = 0
    for index, level_ds in enumerate(level_downsamples):
        if level_ds <= downsample * (1 + 1e-6) and level_ds >= level_downsamples[best]:
            best = index
    return best


def render_slide_tile(slide: SlideTileSource, geometry: DeepZoomGeometry, dz_level: int, t_col: int,
                      t_row: int) -> np.ndarray:
    """RGB tile (H, W, 3) uint8, read from the best pyramid level and resized to the DZI tile size."""
    region = geometry.tile_region(dz_level, t_col, t_row)
    downsamples = list(slide.info.level_downsamples)
    level = best_level_for_downsample(downsamples, region.downsample)
    level_ds = float(downsamples[level])
    lvl_w = max(1, math.ceil(region.l0_size_wh[0] / level_ds))
    lvl_h = max(1, math.ceil(region.l0_size_wh[1] / level_ds))
    pixels = np.asarray(slide.read_region(region.l0_xy, level, (lvl_w, lvl_h)))[..., :3]
    out_w, out_h = region.dz_size_wh
    if (lvl_w, lvl_h) != (out_w, out_h):
        pixels = cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """The named colour map as a read-only (256, 3) uint8 RGB table."""
    ramp = np.arange(256, dtype=np.uint8)
    lut: np.ndarray
    if name == "gray":
        lut = np.repeat(ramp[:, None], 3, axis=1)
    elif name in _CV2_COLORMAPS:
        lut = cv2.applyColorMap(ramp[:, None], _CV2_COLORMAPS[name])[:, 0, ::-1]
    else:
        raise UnknownColormapError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    lut = np.ascontiguousarray(lut, dtype=np.uint8)
    lut.setflags(write=False)
    return lut


class HeatmapSource(Protocol):
    """A probability raster in the heatmap frame (`l0 = hm * hm_downsample`), optionally with a pyramid."""

    @property
    def hm_downsample(self) -> float: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...  # relative to heatmap level 0

    def level_size_wh(self, level: int) -> tuple[int, int]: ...

    def read_box(self, level: int, hml_xy: tuple[int, int], hml_size_wh: tuple[int, int]) -> np.ndarray:
        """Probabilities (H, W) float32 in [0, 1], NaN where not analysed; the box lies inside the level."""
        ...


def _sample_axis(dz_start: int, count: int, d: int, l0_extent: int, l0_per_cell: float,
                 cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap cell index under each output pixel's centre along one axis, and whether it lies on the heatmap."""
    l0_lo = (dz_start + np.arange(count, dtype=np.float64)) * d
    l0_hi = np.minimum(l0_lo + d, l0_extent)
    l0_centre = (l0_lo + l0_hi) / 2.0
    index = np.floor(l0_centre / l0_per_cell).astype(np.int64)
    inside = (index >= 0) & (index < cells)
    return np.clip(index, 0, cells - 1), inside


def sample_overlay(heatmap: HeatmapSource, geometry: DeepZoomGeometry, dz_level: int, t_col: int,
                   t_row: int) -> np.ndarray:
    """Probabilities (H, W) float32 under each pixel of a slide-aligned tile (nearest cell; NaN = none)."""
    region = geometry.tile_region(dz_level, t_col, t_row)
    out_w, out_h = region.dz_size_wh
    hm_per_dz = region.downsample / float(heatmap.hm_downsample)
    level = best_level_for_downsample(heatmap.level_downsamples, hm_per_dz)
    l0_per_cell = float(heatmap.hm_downsample) * float(heatmap.level_downsamples[level])
    hml_w, hml_h = heatmap.level_size_wh(level)
    xs, x_in = _sample_axis(region.dz_xy[0], out_w, region.downsample, geometry.l0_size_wh[0], l0_per_cell, hml_w)
    ys, y_in = _sample_axis(region.dz_xy[1], out_h, region.downsample, geometry.l0_size_wh[1], l0_per_cell, hml_h)
    out = np.full((out_h, out_w), np.nan, dtype=np.float32)
    if not (x_in.any() and y_in.any()):
        return out
    x0, x1 = int(xs[x_in].min()), int(xs[x_in].max()) + 1
    y0, y1 = int(ys[y_in].min()), int(ys[y_in].max()) + 1
    box = np.asarray(heatmap.read_box(level, (x0, y0), (x1 - x0, y1 - y0)), dtype=np.float32)
    picked = box[np.ix_(ys[y_in] - y0, xs[x_in] - x0)]
    out[np.ix_(np.flatnonzero(y_in), np.flatnonzero(x_in))] = picked
    return out


def colorize(probs: np.ndarray, cmap: str = "jet", threshold: float = 0.5) -> np.ndarray:
    """RGBA (H, W, 4) uint8: colour from `cmap`, transparent where NaN (not analysed) or below `threshold`."""
    lut = colormap_lut(cmap)
    valid = np.isfinite(probs)
    clipped = np.clip(np.where(valid, probs, 0.0), 0.0, 1.0)
    rgba = np.zeros((*probs.shape, 4), dtype=np.uint8)
    rgba[..., :3] = lut[np.rint(clipped * 255.0).astype(np.uint8)]
    rgba[..., 3] = np.where(valid & (clipped >= threshold), 255, 0).astype(np.uint8)
    return rgba


def render_overlay_tile(heatmap: HeatmapSource, geometry: DeepZoomGeometry, dz_level: int, t_col: int, t_row: int,
                        *, cmap: str = "jet", threshold: float = 0.5) -> np.ndarray:
    """Transparent RGBA overlay tile (H, W, 4) uint8 in the slide's DZI geometry."""
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise DeepZoomError(f"threshold must lie in [0, 1], got {threshold}")
    colormap_lut(cmap)  # validate before reading any pixels
    return colorize(sample_overlay(heatmap, geometry, dz_level, t_col, t_row), cmap, threshold)


def encode_tile(pixels: np.ndarray, fmt: TileFormat, quality: int = 85) -> bytes:
    """Encode an RGB or RGBA tile as JPEG (alpha dropped) or PNG bytes."""
    if fmt == "jpeg":
        bgr = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == "png":
        code = cv2.COLOR_RGBA2BGRA if pixels.shape[-1] == 4 else cv2.COLOR_RGB2BGR
        ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(pixels), code),
                               [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise DeepZoomError(f"unknown tile format {fmt!r}; use 'jpeg' or 'png'")
    if not ok:
        raise DeepZoomError(f"could not encode a {pixels.shape} tile as {fmt}")
    return bytes(buf.tobytes())


def _halve_nanmean(cells: np.ndarray) -> np.ndarray:
    """2x2 mean that ignores NaN cells (a block with no analysed cell stays NaN)."""
    h, w = cells.shape
    padded = np.full((h + h % 2, w + w % 2), np.nan, dtype=np.float32)
    padded[:h, :w] = cells
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    valid = np.isfinite(blocks)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0.0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


class ArrayHeatmap:
    """An in-memory heatmap (H, W) float32 with NaN where not analysed, plus a 2x nan-mean pyramid."""

    def __init__(self, hm_probs: np.ndarray, hm_downsample: float, min_level_size: int = 256) -> None:
        probs = np.asarray(hm_probs, dtype=np.float32)
        if probs.ndim != 2 or probs.size == 0:
            raise DeepZoomError(f"a heatmap must be a non-empty 2-D array, got shape {probs.shape}")
        if not hm_downsample > 0:
            raise DeepZoomError(f"hm_downsample must be positive, got {hm_downsample}")
        self._hm_downsample = float(hm_downsample)
        self._levels = [probs]
        while max(self._levels[-1].shape) > min_level_size:
            self._levels.append(_halve_nanmean(self._levels[-1]))

    @property
    def hm_downsample(self) -> float:
        return self._hm_downsample

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(1 << i) for i in range(len(self._levels)))

    def level_size_wh(self, level: int) -> tuple[int, int]:
        h, w = self._levels[level].shape
        return (w, h)

    def read_box(self, level: int, hml_xy: tuple[int, int], hml_size_wh: tuple[int, int]) -> np.ndarray:
        x, y = hml_xy
        w, h = hml_size_wh
        return self._levels[level][y:y + h, x:x + w]


def decode_stored_heatmap(values: np.ndarray) -> np.ndarray:
    """Stored uint8 heatmap values (0 = not analysed, 1..255 = 1 + 254 p) as float32 with NaN."""
    stored = np.asarray(values)
    if stored.dtype != np.uint8:
        return stored.astype(np.float32)  # a float heatmap carries NaN itself
    prob, covered = decode_heatmap(stored)
    prob[~covered] = np.nan
    return prob


class TiffHeatmap:
    """The pyramidal heatmap TIFF of a finished job, read region by region (tifffile + zarr, thread-safe)."""

    def __init__(self, path: str | os.PathLike[str], hm_downsample: float) -> None:
        import zarr  # 0.34 s to import (measured here); only finished jobs' heatmaps are read through it

        if not hm_downsample > 0:
            raise DeepZoomError(f"hm_downsample must be positive, got {hm_downsample}")
        self._hm_downsample = float(hm_downsample)
        self._lock = threading.Lock()
        try:
            self._tif = tifffile.TiffFile(path)
            levels = self._tif.series[0].levels
            self._arrays = [zarr.open_array(self._tif.aszarr(level=i), mode="r") for i in range(len(levels))]
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as err:
            raise DeepZoomError(f"cannot read the heatmap TIFF {path}: {err}; re-run the job to rewrite it") from err
        self._sizes_wh = [(int(a.shape[1]), int(a.shape[0])) for a in self._arrays]

    @property
    def hm_downsample(self) -> float:
        return self._hm_downsample

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        base_w, base_h = self._sizes_wh[0]
        out = []
        for i, (w, h) in enumerate(self._sizes_wh):
            # levels written by 2x2 halving cover exactly 2^i base cells each, whatever the ceil rounding
            halved = (w, h) == (-(-base_w // (1 << i)), -(-base_h // (1 << i)))
            out.append(float(1 << i) if halved else base_w / w)
        return tuple(out)

    def level_size_wh(self, level: int) -> tuple[int, int]:
        return self._sizes_wh[level]

    def read_box(self, level: int, hml_xy: tuple[int, int], hml_size_wh: tuple[int, int]) -> np.ndarray:
        x, y = hml_xy
        w, h = hml_size_wh
        with self._lock:
            values = np.asarray(self._arrays[level][y:y + h, x:x + w])
        return decode_stored_heatmap(values)

    def close(self) -> None:
        """Close the file."""
        self._tif.close()
