"""The direct TIFF tile path: raw tile bytes read with `os.pread` and decoded by libjpeg-turbo, without the GIL.

For a tiled 8-bit RGB/YCbCr pyramid level of a TIFF-family slide (SVS, generic tiled TIFF), `TiffLevel` reads the
bytes of one source tile at the offsets tifffile lists and decodes them through imagecodecs at full size, or
through OpenCV with libjpeg's DCT scaling (1/2, 1/4, 1/8) when the plan reads at least that many times the input
size on a matching lattice (`decode_scale`). `read_fast_tile` assembles one plan tile from source tiles, sharing
them between neighbouring plan tiles through an `LRUCache`, and resizes it to the model input. `TileReader` uses
it on threads, `tile_reader_procs` in worker processes. Planes: `l0_` level-0 pixels, `lvl_` pixels of the
plan's level, `in_` model-input pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import tifffile

from service.lru import LRUCache
from service.slide.errors import SlideError
from service.slide.tiling import TilePlan

__all__ = ["CACHE_BYTES", "FAST_VENDORS", "SourceTileCache", "TiffLevel", "decode_scale", "read_fast_tile",
           "resize_square", "source_tile_cache"]

_JPEG = 7
_RGB, _YCBCR = 2, 6
CACHE_BYTES = 96 << 20  # default budget of the decoded source tiles one reader (or reader process) keeps
FAST_VENDORS = ("aperio", "generic-tiff")  # formats whose OpenSlide level-0 frame is tifffile's first series
_ADOBE_NO_TRANSFORM = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0 = RGB
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


SourceTileCache = LRUCache[int, np.ndarray]  # decoded source tiles by index within the level


def source_tile_cache(max_bytes: int = CACHE_BYTES) -> SourceTileCache:
    """A cache of decoded source tiles bounded by their bytes (thread-safe: reader threads share one)."""
    return LRUCache(max_size=max_bytes, size_of=lambda tile: int(tile.nbytes))


class TiffLevel:
    """Direct access to the tiles of one pyramid level of a TIFF file."""

    def __init__(self, path: Path, level: int, expected_wh: tuple[int, int]) -> None:
        self._tif = tifffile.TiffFile(path)
        try:
            page = self._tif.series[0].levels[level].keyframe
            self._check(page, expected_wh)
        except (SlideError, IndexError, AttributeError):
            self._tif.close()
            raise
        self.page = page
        self.tile_wh = (int(page.tilewidth), int(page.tilelength))
        self.size_wh = (int(page.imagewidth), int(page.imagelength))
        self.tiles_across = -(-self.size_wh[0] // self.tile_wh[0])
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.jpeg = page.compression == _JPEG
        self.tables = page.jpegtables
        # Aperio writes RGB (not YCbCr) JPEG tiles without a JFIF marker: tell libjpeg the colour space
        self.colorspace = _RGB if (page.photometric == _RGB and not page.is_jfif) else None
        # a complete JPEG stream for OpenCV = SOI, an Adobe marker saying "no colour transform" for RGB tiles,
        # the shared tables without their SOI/EOI, then the tile without its SOI
        tables = bytes(self.tables or b"")
        tables = tables[2:] if tables.startswith(b"\xff\xd8") else tables
        tables = tables[:-2] if tables.endswith(b"\xff\xd9") else tables
        self._prefix = b"\xff\xd8" + (_ADOBE_NO_TRANSFORM if self.colorspace == _RGB else b"") + tables
        self.scale = 1
        self.grid_tile_wh, self.grid_size_wh = self.tile_wh, self.size_wh

    def set_scale(self, scale: int) -> None:
        """Decode JPEG tiles at 1/`scale` (libjpeg DCT scaling); grid sizes are then in scaled pixels."""
        self.scale = scale
        self.grid_tile_wh = (self.tile_wh[0] // scale, self.tile_wh[1] // scale)
        self.grid_size_wh = (self.size_wh[0] // scale, self.size_wh[1] // scale)

    @staticmethod
    def _check(page: Any, expected_wh: tuple[int, int]) -> None:
        """Raise SlideError unless this page can be decoded tile by tile into RGB."""
        if not page.is_tiled or page.planarconfig != 1 or page.bitspersample != 8 or page.samplesperpixel != 3:
            raise SlideError("level is not tiled contiguous 8-bit RGB")
        if page.photometric not in (_RGB, _YCBCR) or (page.photometric == _YCBCR and page.compression != _JPEG):
            raise SlideError(f"photometric {page.photometric} with compression {page.compression} not handled")
        if page.tiledepth != 1 or (int(page.imagewidth), int(page.imagelength)) != tuple(expected_wh):
            raise SlideError("TIFF level does not match the slide's level")

    def decode(self, fd: int, index: int) -> np.ndarray:
        """Decode source tile `index` to (tile_h, tile_w, 3) uint8; white when the file has no data for it."""
        tw, th = self.grid_tile_wh
        count = int(self.counts[index])
        if count == 0:
            return np.full((th, tw, 3), 255, np.uint8)
        data = os.pread(fd, count, int(self.offsets[index]))
        if self.scale > 1:
            stream = np.frombuffer(self._prefix + data[2:], np.uint8)
            bgr = cv2.imdecode(stream, _REDUCED[self.scale])
            if bgr is None or bgr.shape[:2] != (th, tw):
                raise SlideError(f"JPEG tile {index} could not be decoded at 1/{self.scale} scale")
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if self.jpeg:
            tile: Any = imagecodecs.jpeg8_decode(data, tables=self.tables, colorspace=self.colorspace,
                                                 outcolorspace=_RGB)
        else:
            tile = self.page.decode(data, index)[0]
        return np.asarray(tile, np.uint8).reshape(th, tw, -1)[..., :3]

    def close(self) -> None:
        self._tif.close()


def resize_square(region: np.ndarray, s: int) -> np.ndarray:
    """Square region to (s, s): area averaging when shrinking, via an exact multiple of s when 2x or more."""
    size = region.shape[0]
    if size == s:
        return region
    if size < s:
        return cv2.resize(region, (s, s), interpolation=cv2.INTER_LINEAR)
    k = size // s
    if k >= 2 and size != k * s:  # OpenCV's area resize is about 5-20x faster for integer ratios
        region = cv2.resize(region, (k * s, k * s), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(region, (s, s), interpolation=cv2.INTER_AREA)


def _assemble_region(level: TiffLevel, fd: int, cache: SourceTileCache, lvl_x: int, lvl_y: int, size: int) -> np.ndarray:
    """Assemble a (size, size, 3) level region from source tiles; white outside the level."""
    out = np.full((size, size, 3), 255, np.uint8)
    (tw, th), (w, h) = level.grid_tile_wh, level.grid_size_wh
    x0, y0, x1, y1 = max(lvl_x, 0), max(lvl_y, 0), min(lvl_x + size, w), min(lvl_y + size, h)
    for ty in range(y0 // th, -(-y1 // th)) if y1 > y0 else ():
        for tx in range(x0 // tw, -(-x1 // tw)) if x1 > x0 else ():
            index = ty * level.tiles_across + tx
            tile = cache.get(index)
            if tile is None:
                tile = level.decode(fd, index)
                cache.put(index, tile)
            sx0, sy0 = max(x0, tx * tw), max(y0, ty * th)
            sx1, sy1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
            out[sy0 - lvl_y:sy1 - lvl_y, sx0 - lvl_x:sx1 - lvl_x] = \
                tile[sy0 - ty * th:sy1 - ty * th, sx0 - tx * tw:sx1 - tx * tw]
    return out


def read_fast_tile(level: TiffLevel, fd: int, cache: SourceTileCache, l0_xy: tuple[int, int], lvl_tile_size: int,
               level_downsample: float, input_size: int) -> np.ndarray:
    """One plan tile through the direct TIFF path, resized to (input_size, input_size, 3) (threads and processes)."""
    f = level.scale * level_downsample  # level-0 pixels per decoded pixel
    # round, not floor: with a downsample like 4.0003 a lattice corner maps to 999.93, meaning 1000
    region = _assemble_region(level, fd, cache, int(round(l0_xy[0] / f)), int(round(l0_xy[1] / f)),
                          max(1, int(round(lvl_tile_size / level.scale))))
    return resize_square(region, input_size)


def decode_scale(plan: TilePlan, input_size: int, tile_wh: tuple[int, int]) -> int:
    """Largest JPEG DCT scale (2, 4 or 8) that keeps at least `input_size` pixels per tile side, exactly.

    Exact means the scale divides the plan's corner lattice (in level pixels) and the source tile size, so every
    decoded pixel is the average of whole level pixels, as an area resize of the full-size read would give.
    """
    lvl_align = plan.extra.get("l0_align", plan.level_downsample) / plan.level_downsample
    align = int(round(lvl_align)) if abs(lvl_align - round(lvl_align)) < 1e-6 else 1
    for scale in (8, 4, 2):
        fits = plan.lvl_tile_size / scale >= input_size and align % scale == 0
        if fits and tile_wh[0] % scale == 0 and tile_wh[1] % scale == 0:
            return scale
    return 1
