"""Per-tile foreground maps into one slide heatmap, in bounded memory; the heatmap TIFF and the PNG overlay.

Planes: `l0_` level-0 slide pixels, `fm_` model output cells, `hm_` heatmap cells with
`l0 = hm * hm_downsample`. The heatmap is built in horizontal bands of `hm_` rows, so no array larger than
one band (or one pyramid tile row) is ever allocated, whatever the slide size.

Stored values (the heatmap TIFF, single channel uint8): 0 = not analysed (no tissue tile covers the cell);
1..255 = analysed, foreground probability `p = (v - 1) / 254`. So "analysed, p = 0" (1) differs from "not
analysed" (0) without a second channel, and every TIFF reader sees one plain grey image.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

__all__ = [
    "NODATA",
    "FgLoader",
    "HeatmapBand",
    "HeatmapGrid",
    "StitchError",
    "array_loader",
    "cosine_window",
    "decode_heatmap",
    "encode_heatmap",
    "read_heatmap_level",
    "render_overlay",
    "stitch_array",
    "stitch_bands",
    "tile_footprints",
    "write_heatmap_tiff",
    "write_overlay_png",
]

logger = logging.getLogger(__name__)

NODATA = 0
TIFF_TILE = 256
BAND_CELLS = 1 << 19  # cells per stitched band (2 MB per float32 array)
_HALVE_COLS = 2048  # columns halved at a time when building pyramid levels
_OVERLAY_ROWS = 64  # thumbnail rows blended at a time (float32 copies of 64 x 1024 px: 0.8 MB each)

FgLoader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Sorted tile indices -> (indices actually available (n,), fg maps float (n, fm_h, fm_w))."""


class StitchError(ValueError):
    """Tile outputs that cannot be placed into the declared heatmap frame."""


@dataclass(frozen=True)
class HeatmapGrid:
    """The heatmap frame: level-0 slide size and the declared downsample (l0 pixels per heatmap cell)."""

    l0_size_wh: tuple[int, int]
    hm_downsample: float

    def __post_init__(self) -> None:
        """Refuse a frame that cannot hold a heatmap."""
        if not self.hm_downsample > 0 or not math.isfinite(self.hm_downsample):
            raise StitchError(f"hm_downsample must be a positive number, got {self.hm_downsample!r}")
        if min(self.l0_size_wh) < 1:
            raise StitchError(f"the slide size must be positive, got {self.l0_size_wh!r}")

    @property
    def hm_size_wh(self) -> tuple[int, int]:
        """Heatmap size in cells: the level-0 size divided by the downsample, rounded up."""
        w, h = self.l0_size_wh
        return (max(1, math.ceil(w / self.hm_downsample)), max(1, math.ceil(h / self.hm_downsample)))


@dataclass(frozen=True)
class HeatmapBand:
    """Rows `[hm_y0, hm_y0 + h)` of the heatmap: probability (h, W) float32 and coverage (h, W) bool."""

    hm_y0: int
    prob: np.ndarray
    covered: np.ndarray

    def encoded(self) -> np.ndarray:
        """The band as stored: uint8 (h, W), 0 = not analysed, 1..255 = probability."""
        return encode_heatmap(self.prob, self.covered)


def sample_mask(mask: np.ndarray, l0_per_px: float, l0_y: np.ndarray, l0_x: np.ndarray) -> np.ndarray:
    """A boolean mask (a mask pixel = `l0_per_px` level-0 px) at level-0 points: the outer product of rows `l0_y`
    (..., h) and columns `l0_x` (..., w) gives (..., h, w); nearest pixel, False outside the mask."""
    mh, mw = mask.shape
    rows, cols = (np.asarray(l0_y) / l0_per_px).astype(np.int64), (np.asarray(l0_x) / l0_per_px).astype(np.int64)
    inside = (rows < mh)[..., :, None] & (cols < mw)[..., None, :]
    picked: np.ndarray = mask[np.minimum(rows, mh - 1)[..., :, None], np.minimum(cols, mw - 1)[..., None, :]]
    return picked & inside


def encode_heatmap(prob: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Probability + coverage -> stored uint8 values (0 = not analysed, else 1 + round(254 p))."""
    values = 1.0 + np.rint(np.clip(prob, 0.0, 1.0) * 254.0)
    return np.where(covered, values, NODATA).astype(np.uint8)


def decode_heatmap(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored uint8 values -> (probability float32, coverage bool); uncovered cells read as probability 0."""
    covered = values != NODATA
    prob = np.where(covered, (values.astype(np.float32) - 1.0) / 254.0, 0.0).astype(np.float32)
    return prob, covered


def cosine_window(size_hw: tuple[int, int], floor: float = 1e-3) -> np.ndarray:
    """A separable raised-cosine blending window (h, w), floored so that no cell weighs zero."""
    h, w = size_hw
    wy = np.sin(np.pi * (np.arange(h) + 0.5) / h)
    wx = np.sin(np.pi * (np.arange(w) + 0.5) / w)
    window: np.ndarray = np.maximum(np.outer(wy, wx), floor).astype(np.float32)
    return window


def tile_footprints(grid: HeatmapGrid, l0_xy: np.ndarray, l0_tile_size: float) -> np.ndarray:
    """Heatmap cells each tile covers: (N, 4) int64 `hm_x0, hm_y0, hm_x1, hm_y1` (end exclusive, unclipped).

    Edges snap outward with a tolerance of one level-0 pixel, so rounding in the tile plan never opens a
    one-cell gap between neighbouring tiles, while exactly aligned tiles keep their exact footprint.
    """
    xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
    tol = min(0.49, 1.01 / grid.hm_downsample)
    hm_start = np.floor(xy / grid.hm_downsample + tol)
    hm_end = np.ceil((xy + float(l0_tile_size)) / grid.hm_downsample - tol)
    hm_end = np.maximum(hm_end, hm_start + 1)
    return np.concatenate([hm_start, hm_end], axis=1).astype(np.int64)


def array_loader(fg: np.ndarray) -> FgLoader:
    """A loader over tile maps already in memory (N, h, w)."""

    def load(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return indices, fg[indices]

    return load


def _fit(fg: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resample one tile map to its footprint; identity when the sizes already agree."""
    if fg.shape[1] == size_wh[0] and fg.shape[0] == size_wh[1]:
        return fg.astype(np.float32, copy=False)
    shrink = size_wh[0] < fg.shape[1]
    return cv2.resize(
        fg.astype(np.float32), size_wh, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def _band_tiles(
    footprints: np.ndarray, order: np.ndarray, y0_sorted: np.ndarray, b0: int, b1: int
) -> np.ndarray:
    """Indices (sorted) of the tiles whose footprint meets heatmap rows [b0, b1)."""
    candidates = order[: np.searchsorted(y0_sorted, b1, side="left")]
    return np.sort(candidates[footprints[candidates, 3] > b0])


def stitch_bands(
    grid: HeatmapGrid,
    l0_xy: np.ndarray,
    l0_tile_size: float,
    load_fg: FgLoader,
    *,
    band_height: int | None = None,
    window: np.ndarray | None = None,
) -> Iterator[HeatmapBand]:
    """Yield the heatmap band by band, top to bottom; overlaps are averaged with `window` weights (else equal).

    The default band height keeps a band near `BAND_CELLS` cells (at most one TIFF tile row), so a band's
    arrays stay a few MB however wide the slide is.
    """
    hm_w, hm_h = grid.hm_size_wh
    if band_height is None:
        band_height = max(8, min(TIFF_TILE, BAND_CELLS // hm_w))
    if band_height < 1:
        raise StitchError(f"band_height must be >= 1, got {band_height}")
    footprints = tile_footprints(grid, l0_xy, l0_tile_size)
    order = np.argsort(footprints[:, 1], kind="stable")
    y0_sorted = footprints[order, 1]
    windows: dict[tuple[int, int], np.ndarray] = {}
    for b0 in range(0, hm_h, band_height):
        b1 = min(hm_h, b0 + band_height)
        acc = np.zeros((b1 - b0, hm_w), np.float32)
        weight = np.zeros((b1 - b0, hm_w), np.float32)
        indices, maps = load_fg(_band_tiles(footprints, order, y0_sorted, b0, b1))
        for t, fm in zip(indices, maps, strict=True):
            x0, y0, x1, y1 = (int(v) for v in footprints[t])
            size_wh = (x1 - x0, y1 - y0)
            if size_wh not in windows:
                windows[size_wh] = (
                    np.ones(size_wh[::-1], np.float32) if window is None else _fit(window, size_wh)
                )
            w_tile = windows[size_wh]
            cy0, cy1, cx0, cx1 = max(y0, b0), min(y1, b1), max(x0, 0), min(x1, hm_w)
            if cy0 >= cy1 or cx0 >= cx1:
                continue
            src = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
            dst = (slice(cy0 - b0, cy1 - b0), slice(cx0, cx1))
            w_part = w_tile[src]
            acc[dst] += _fit(fm, size_wh)[src] * w_part
            weight[dst] += w_part
        covered = weight > 0
        prob = np.divide(acc, weight, out=np.zeros_like(acc), where=covered)
        yield HeatmapBand(hm_y0=b0, prob=prob, covered=covered)


def stitch_array(
    grid: HeatmapGrid, l0_xy: np.ndarray, l0_tile_size: float, fg: np.ndarray, **kwargs: Any
) -> HeatmapBand:
    """The whole heatmap as one band (for small slides and tests; large slides use `stitch_bands`)."""
    bands = list(stitch_bands(grid, l0_xy, l0_tile_size, array_loader(np.asarray(fg)), **kwargs))
    return HeatmapBand(
        hm_y0=0,
        prob=np.concatenate([b.prob for b in bands]),
        covered=np.concatenate([b.covered for b in bands]),
    )


def _rebanded(bands: Iterable[HeatmapBand], rows: int) -> Iterator[np.ndarray]:
    """Encoded uint8 blocks of exactly `rows` rows (the last one may be shorter) from bands of any height."""
    pending: list[np.ndarray] = []
    count = 0
    for band in bands:
        pending.append(band.encoded())
        count += pending[-1].shape[0]
        while count >= rows:
            block = np.concatenate(pending)
            yield block[:rows]
            rest = block[rows:]
            pending, count = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if count:
        yield np.concatenate(pending)


def _tiles_of(block: np.ndarray, width: int, tile: int) -> Iterator[np.ndarray]:
    """Split a block of at most `tile` rows into zero-padded `tile` x `tile` TIFF tiles, left to right."""
    for x in range(0, width, tile):
        out = np.zeros((tile, tile), np.uint8)
        part = block[:, x : x + tile]
        out[: part.shape[0], : part.shape[1]] = part
        yield out


def _halve(block: np.ndarray) -> np.ndarray:
    """Next pyramid level of an encoded block, a few columns at a time to keep the float copies small."""
    return np.concatenate(
        [_halve_part(block[:, x : x + _HALVE_COLS]) for x in range(0, block.shape[1], _HALVE_COLS)], axis=1
    )


def _halve_part(block: np.ndarray) -> np.ndarray:
    """Mean probability over the analysed cells of each 2x2 (an odd last row or column stands alone)."""
    prob, covered = decode_heatmap(block)
    h, w = block.shape
    ph, pw = h + h % 2, w + w % 2
    p = np.zeros((ph, pw), np.float32)
    c = np.zeros((ph, pw), np.float32)
    p[:h, :w], c[:h, :w] = prob * covered, covered
    p_sum = p.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    c_sum = c.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    mean = np.divide(p_sum, c_sum, out=np.zeros_like(p_sum), where=c_sum > 0)
    return encode_heatmap(mean, c_sum > 0)


def _level_tiles(
    blocks: Iterable[np.ndarray], width: int, tile: int, spill: Any | None
) -> Iterator[np.ndarray]:
    """TIFF tiles of one level; each block is also halved and appended to `spill` for the next level."""
    carry: np.ndarray | None = None
    for block in blocks:
        yield from _tiles_of(block, width, tile)
        if spill is None:
            continue
        rows = block if carry is None else np.concatenate([carry, block])
        even = rows.shape[0] - rows.shape[0] % 2
        carry = rows[even:] if even < rows.shape[0] else None
        if even:
            spill.write(_halve(rows[:even]).tobytes())
    if spill is not None and carry is not None:
        spill.write(_halve(carry).tobytes())


def _spilled_blocks(path: Path, size_wh: tuple[int, int], rows: int) -> Iterator[np.ndarray]:
    """Read a spilled level back `rows` rows at a time."""
    w, h = size_wh
    with path.open("rb") as fh:
        for _ in range(0, h, rows):
            data = np.fromfile(fh, dtype=np.uint8, count=rows * w)
            yield data.reshape(-1, w)


def write_heatmap_tiff(
    path: str | os.PathLike[str],
    bands: Iterable[HeatmapBand],
    grid: HeatmapGrid,
    *,
    l0_mpp: float,
    description: str,
    tile: int = TIFF_TILE,
) -> list[tuple[int, int]]:
    """Write the heatmap as a tiled pyramidal TIFF (levels halve until one tile); return the level sizes (w, h).

    Bands are consumed once, top to bottom. Each level is spilled, halved, to a temporary file that feeds the
    next level, so memory holds one tile row per level at a time.
    """
    out = Path(path)
    size_wh = grid.hm_size_wh
    cell_um = l0_mpp * grid.hm_downsample
    px_per_cm = 1e4 / cell_um
    sizes: list[tuple[int, int]] = []
    with (
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".heatmap-") as tmp,
        tifffile.TiffWriter(Path(tmp) / out.name) as tif,
    ):
        blocks: Iterable[np.ndarray] = _rebanded(bands, tile)
        level = 0
        while True:
            last = max(size_wh) <= tile
            spill_path = Path(tmp) / f"level{level + 1}.raw"
            with open(spill_path, "wb") if not last else contextlib.nullcontext() as spill:
                tif.write(
                    _level_tiles(blocks, size_wh[0], tile, None if last else spill),
                    shape=(size_wh[1], size_wh[0]),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="minisblack",
                    compression="zlib",
                    resolution=(px_per_cm / 2**level, px_per_cm / 2**level),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    description=description if level == 0 else None,
                    metadata=None,
                )
            sizes.append(size_wh)
            if last:
                break
            size_wh = (math.ceil(size_wh[0] / 2), math.ceil(size_wh[1] / 2))
            blocks = _spilled_blocks(spill_path, size_wh, tile)
            level += 1
        tif.close()
        os.replace(Path(tmp) / out.name, out)  # readers never see a half-written heatmap
    logger.info("heatmap %s written: %d levels, level 0 %dx%d cells", out, len(sizes), *sizes[0])
    return sizes


def read_heatmap_level(path: str | os.PathLike[str], min_size_wh: tuple[int, int]) -> np.ndarray:
    """The smallest stored pyramid level at least `min_size_wh` (else level 0), as stored uint8 values."""
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        chosen = levels[0]
        for level in levels:
            h, w = level.shape[:2]
            if w >= min_size_wh[0] and h >= min_size_wh[1]:
                chosen = level
        return np.asarray(chosen.asarray())


def render_overlay(
    thumb_rgb: np.ndarray, hm_values: np.ndarray, grid: HeatmapGrid, *, alpha: float = 0.45
) -> np.ndarray:
    """The slide thumbnail (H, W, 3) with the colour-mapped heatmap blended where analysed (turbo colour map)."""
    th, tw = thumb_rgb.shape[:2]
    hm_h, hm_w = hm_values.shape
    # the stored level may be any pyramid level: scale its cells to thumbnail pixels via level-0 units
    l0_per_cell = grid.hm_downsample * grid.hm_size_wh[0] / hm_w
    scale = tw / grid.l0_size_wh[0]
    size_wh = (max(1, round(hm_w * l0_per_cell * scale)), max(1, round(hm_h * l0_per_cell * scale)))
    resized = cv2.resize(hm_values, size_wh, interpolation=cv2.INTER_NEAREST)
    canvas = np.zeros((th, tw), np.uint8)
    canvas[: min(th, size_wh[1]), : min(tw, size_wh[0])] = resized[:th, :tw]
    prob, covered = decode_heatmap(canvas)
    colour = cv2.applyColorMap(np.rint(prob * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[:, :, ::-1]
    del prob, canvas
    out = np.empty((th, tw, 3), np.uint8)
    for r0 in range(0, th, _OVERLAY_ROWS):  # float32 blending a few rows at a time, not on whole-image copies
        rows = slice(r0, r0 + _OVERLAY_ROWS)
        px = thumb_rgb[rows].astype(np.float32)
        tinted = (1 - alpha) * px + alpha * colour[rows].astype(np.float32)
        blended = np.where(covered[rows, :, None], tinted, px)
        out[rows] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


LEGEND_H = 96  # px of the legend strip under the overlay
LEGEND_MIN_W = 720  # the strip (and so the image) is at least this wide, for the three parts to fit
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_INK = (30, 30, 30)


def nice_length(target: float) -> float:
    """The 1, 2 or 5 x 10^k at most `target` (at least the smallest of them under it)."""
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return float(m * 10**exp)
    return float(10**exp)


def _length_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} um"


def overlay_legend(width: int, *, um_per_px: float | None, threshold: float, call: str, detail: str,
                   cmap_lut: np.ndarray, label: str = "foreground probability") -> tuple[np.ndarray, dict[str, Any]]:
    """The legend strip (LEGEND_H x width, RGB): colour bar with 0 / threshold / 1, scale bar, the call.

    Returns the strip and where its parts are (for the tests and the report): the colour bar's x range, the scale
    bar's length in µm and px (None when the slide's µm/px is unknown)."""
    strip = np.full((LEGEND_H, width, 3), 255, np.uint8)
    # colour bar, left third
    x0, x1, y0, y1 = 16, 16 + max(64, width // 3 - 32), 34, 54
    ramp = np.linspace(0, 255, x1 - x0).astype(np.uint8)
    strip[y0:y1, x0:x1] = cmap_lut[ramp][None, :, :]
    cv2.rectangle(strip, (x0, y0), (x1 - 1, y1 - 1), _INK, 1)
    cv2.putText(strip, label, (x0, 24), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
    for value, text in ((0.0, "0"), (threshold, f"t={threshold:.2f}"), (1.0, "1")):
        x = int(round(x0 + value * (x1 - x0 - 1)))
        cv2.line(strip, (x, y1), (x, y1 + 6), _INK, 1)
        size = cv2.getTextSize(text, _FONT, 0.4, 1)[0][0]
        cv2.putText(strip, text, (min(max(x - size // 2, 0), width - size), y1 + 20), _FONT, 0.4, _INK, 1,
                    cv2.LINE_AA)
    info: dict[str, Any] = {"colour_bar_x": [x0, x1], "scale_bar_um": None, "scale_bar_px": None}
    # scale bar, middle third
    sx0 = width // 3 + 16
    if um_per_px:
        um = nice_length(um_per_px * max(8, width // 6))
        px = int(round(um / um_per_px))
        cv2.rectangle(strip, (sx0, 40), (sx0 + px - 1, 47), _INK, -1)
        cv2.putText(strip, _length_text(um), (sx0, 30), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
        info.update(scale_bar_um=um, scale_bar_px=px, scale_bar_x=[sx0, sx0 + px])
    else:
        cv2.putText(strip, "scale unknown (no um/px)", (sx0, 44), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
    # the call, right third
    cx0 = 2 * width // 3 - 24
    cv2.putText(strip, call, (cx0, 36), _FONT, 0.6, _INK, 2, cv2.LINE_AA)
    for k, line in enumerate(detail.split("\n")[:2]):
        cv2.putText(strip, line, (cx0, 60 + 18 * k), _FONT, 0.4, _INK, 1, cv2.LINE_AA)
    return strip, info


def with_legend(overlay_rgb: np.ndarray, strip: np.ndarray) -> np.ndarray:
    """The overlay on white, widened to the strip's width when narrower, with the strip under it."""
    h, w = overlay_rgb.shape[:2]
    width = strip.shape[1]
    out = np.full((h + strip.shape[0], width, 3), 255, np.uint8)
    out[:h, :w] = overlay_rgb
    out[h:] = strip
    return out


def write_overlay_png(path: str | os.PathLike[str], overlay_rgb: np.ndarray) -> None:
    """Write an RGB overlay as PNG (atomically: encoded in memory, then renamed into place)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(overlay_rgb[:, :, ::-1]))
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if not ok:
            raise OSError("PNG encoding failed")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, out)
    except OSError as err:
        raise StitchError(
            f"could not write the overlay PNG to {path} ({err}); check the folder exists and is writable"
        ) from err
