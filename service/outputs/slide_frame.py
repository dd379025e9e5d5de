"""The heatmap laid exactly over the slide, for QuPath and ASAP: a pyramidal TIFF in the slide's level-0 frame.

`heatmap.tif` keeps one pixel per model output cell (`hm_downsample` level-0 px each, rarely an integer: 12.9 on a
0.62 µm/px scan) with its size rounded up, so it does not line up with the slide by itself. Viewers that put a
second image over a slide (ASAP's foreground image, QuPath's `BufferedImageOverlay` in the shipped script) scale
it to the slide by the ratio of the sizes; this file gives them the slide's own frame: its base level is the
slide's level 0 divided by an integer `downsample` D, size ceil(W / D) x ceil(H / D), with resolution tags of
mpp x D (D = 1: the slide's exact dimensions), every pixel taking the heatmap cell under its centre; each further
level halves, down to one tile.

Pixel formats (`colormap`):
- a colour map name (`turbo`, `jet`, ...; `service.outputs.deepzoom.COLORMAPS`): RGBA, the colour of the
  probability, alpha `opacity` where the analysis covered the slide and 0 elsewhere;
- `likelihood`: one uint8 channel in heatmap.tif's own encoding, 0 = not analysed, 1 + round(254 p) otherwise (the
  single-channel likelihood map ASAP colours with its look-up tables).

Planes: `l0_` level-0 slide pixels, `hm_` heatmap cells, `fl_` pixels of a level of this file.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from service.outputs.deepzoom import COLORMAPS, colormap_lut
from service.outputs.stitching import NODATA

__all__ = ["LIKELIHOOD", "MAX_BASE_PIXELS", "SlideFrameError", "default_downsample", "write_slide_frame_heatmap"]

logger = logging.getLogger(__name__)

LIKELIHOOD = "likelihood"
TILE = 256
MAX_BASE_PIXELS = 4 << 30  # base levels beyond this (e.g. D = 1 on a 100k x 80k slide) are refused: ask for a larger D


class SlideFrameError(ValueError):
    """The requested slide-frame heatmap cannot be made (bad colour map, downsample or opacity)."""


def default_downsample(hm_downsample: float) -> int:
    """The largest power of two not above the heatmap cell size (at least 1): no cell is skipped."""
    return max(1, 2 ** int(math.floor(math.log2(max(hm_downsample, 1.0)))))


def _tiles(cells: np.ndarray, fl_size_wh: tuple[int, int], l0_per_px: float, hm_downsample: float,
           lut: np.ndarray | None, opacity: int) -> Iterator[np.ndarray]:
    """The level's tiles, row-major, each TILE x TILE (edges padded with zeros, as TIFF tiles are)."""
    hm_h, hm_w = cells.shape
    w, h = fl_size_wh
    for ty in range(0, h, TILE):
        rows = np.minimum(((ty + np.arange(TILE) + 0.5) * l0_per_px / hm_downsample).astype(np.int64), hm_h - 1)
        for tx in range(0, w, TILE):
            cols = np.minimum(((tx + np.arange(TILE) + 0.5) * l0_per_px / hm_downsample).astype(np.int64), hm_w - 1)
            values = cells[np.ix_(rows, cols)]
            values[max(0, h - ty):, :] = NODATA
            values[:, max(0, w - tx):] = NODATA
            if lut is None:
                yield values
                continue
            covered = values != NODATA
            prob = np.where(covered, (values.astype(np.int32) - 1) * 255 // 254, 0).astype(np.uint8)
            rgba = np.empty((TILE, TILE, 4), np.uint8)
            rgba[..., :3] = lut[prob]
            rgba[..., 3] = np.where(covered, opacity, 0)
            yield rgba


def write_slide_frame_heatmap(heatmap_tif: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                              l0_size_wh: tuple[int, int], hm_downsample: float, l0_mpp: float,
                              colormap: str = "turbo", downsample: int | None = None,
                              opacity: float = 0.6) -> dict[str, object]:
    """Write the slide-frame pyramid of a job's heatmap.tif (atomically); returns what was written."""
    if colormap != LIKELIHOOD and colormap not in COLORMAPS:
        raise SlideFrameError(f"colormap must be {LIKELIHOOD!r} or one of {', '.join(COLORMAPS)}, got {colormap!r}")
    if not 0.0 <= opacity <= 1.0:
        raise SlideFrameError(f"opacity must be in [0, 1], got {opacity}")
    d = default_downsample(hm_downsample) if downsample is None else int(downsample)
    if not 1 <= d <= 1024:
        raise SlideFrameError(f"downsample must be an integer in [1, 1024] (level-0 px per pixel), got {downsample}")
    w, h = int(l0_size_wh[0]), int(l0_size_wh[1])
    base = (math.ceil(w / d), math.ceil(h / d))
    if base[0] * base[1] > MAX_BASE_PIXELS:
        raise SlideFrameError(f"a downsample of {d} gives a {base[0]} x {base[1]} base level, over the "
                              f"{MAX_BASE_PIXELS:,} pixels this server writes; ask for downsample "
                              f"{d * 2} or more")
    cells = np.asarray(tifffile.imread(heatmap_tif, key=0))
    lut = None if colormap == LIKELIHOOD else colormap_lut(colormap)
    alpha = int(round(opacity * 255))
    out = Path(out_path)
    levels = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".slide-frame-") as tmp:
        part = Path(tmp) / out.name
        with tifffile.TiffWriter(part, bigtiff=base[0] * base[1] * (1 if lut is None else 4) > 2**31) as tif:
            size, l0_per_px = base, float(d)
            while True:
                channels = {} if lut is None else {"extrasamples": ["unassalpha"]}
                tif.write(
                    _tiles(cells, size, l0_per_px, hm_downsample, lut, alpha),
                    shape=(size[1], size[0]) if lut is None else (size[1], size[0], 4),
                    dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
                    photometric="minisblack" if lut is None else "rgb",
                    resolution=(1e4 / (l0_mpp * l0_per_px), 1e4 / (l0_mpp * l0_per_px)), resolutionunit="CENTIMETER",
                    subfiletype=0 if not levels else 1, metadata=None,
                    description=(f"pixelcam heatmap in the slide frame: level-0 size {w} x {h}, downsample {d}, "
                                 f"{colormap}") if not levels else None,
                    **channels,
                )
                levels.append(size)
                if max(size) <= TILE:
                    break
                size, l0_per_px = (math.ceil(size[0] / 2), math.ceil(size[1] / 2)), l0_per_px * 2
        os.replace(part, out)  # readers never see a half-written file
    logger.info("slide-frame heatmap %s: downsample %d, %d levels, base %d x %d", out.name, d, len(levels), *base)
    return {"path": str(out), "downsample": d, "colormap": colormap, "l0_size_wh": [w, h],
            "levels_wh": [list(s) for s in levels], "mpp": l0_mpp * d}
