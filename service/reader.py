"""The fast tile path: plan tiles in, uint8 (n, S, S, 3) model inputs out, decoded in parallel ahead of inference.

For TIFF-family slides (SVS, generic tiled TIFF) whose plan level is a tiled 8-bit RGB/YCbCr page, the raw tile
bytes are read with `os.pread` at the offsets tifffile lists and decoded by libjpeg-turbo, which releases the GIL:
through imagecodecs at full size, or through OpenCV with libjpeg's DCT scaling (1/2, 1/4, 1/8) when the plan reads
at least that many times the input size on a matching lattice. Decoded source tiles are shared between neighbouring
plan tiles through a small bounded cache. Everything else goes through `Slide.read_region` with one slide handle
per thread. Planes: `l0_` level-0 pixels, `lvl_` pixels
of the plan's level, `in_` model-input pixels (S = input size).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.slides import Slide, SlideError, open_slide
from service.tiling import TilePlan

__all__ = ["TileReadError", "TileReader"]

logger = logging.getLogger(__name__)

_JPEG = 7
_RGB, _YCBCR = 2, 6
_CACHE_BYTES = 96 << 20
_FAST_VENDORS = ("aperio", "generic-tiff")
_ADOBE_NO_TRANSFORM = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0 = RGB
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class TileReadError(SlideError):
    """One plan tile could not be read or decoded; `t_index` names it."""

    def __init__(self, t_index: int, message: str) -> None:
        super().__init__(message)
        self.t_index = t_index


class _TileCache:
    """Decoded source tiles by index, least recently used evicted beyond a byte budget (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, key: int) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: int, value: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


class _TiffLevel:
    """Direct access to the tiles of one pyramid level of a TIFF file."""

    def __init__(self, path: Path, level: int, expected_wh: tuple[int, int]) -> None:
        import tifffile

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
            import imagecodecs

            tile: Any = imagecodecs.jpeg8_decode(data, tables=self.tables, colorspace=self.colorspace,
                                                 outcolorspace=_RGB)
        else:
            tile = self.page.decode(data, index)[0]
        return np.asarray(tile, np.uint8).reshape(th, tw, -1)[..., :3]

    def close(self) -> None:
        self._tif.close()


def _resize(region: np.ndarray, s: int) -> np.ndarray:
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


def _region_fast(level: _TiffLevel, fd: int, cache: _TileCache, lvl_x: int, lvl_y: int, size: int) -> np.ndarray:
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


def _fast_tile(level: _TiffLevel, fd: int, cache: _TileCache, l0_xy: tuple[int, int], lvl_tile_size: int,
               level_downsample: float, input_size: int) -> np.ndarray:
    """One plan tile through the direct TIFF path, resized to (input_size, input_size, 3) (threads and processes)."""
    f = level.scale * level_downsample  # level-0 pixels per decoded pixel
    # round, not floor: with a downsample like 4.0003 a lattice corner maps to 999.93, meaning 1000
    region = _region_fast(level, fd, cache, int(round(l0_xy[0] / f)), int(round(l0_xy[1] / f)),
                          max(1, int(round(lvl_tile_size / level.scale))))
    return _resize(region, input_size)


def _decode_scale(plan: TilePlan, input_size: int, tile_wh: tuple[int, int]) -> int:
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


class TileReader:
    """Reads plan tiles as model inputs; `iter_batches` prefetches on a thread pool so decoding overlaps compute."""

    def __init__(self, slide_path_or_slide: str | Path | Slide, plan: TilePlan, input_size: int | None = None,
                 threads: int | None = None, cache_bytes: int = _CACHE_BYTES, scaled_decode: bool = True,
                 processes: int = 0) -> None:
        if processes < 0:
            raise ValueError(f"processes must be >= 0 (0: decode on threads), got {processes}")
        if isinstance(slide_path_or_slide, Slide):
            self._path: str | Path = slide_path_or_slide.path
            info = slide_path_or_slide.info
        else:
            self._path = slide_path_or_slide
            with open_slide(self._path, mpp_override=plan.slide_mpp) as probe:
                info = probe.info
        self._mpp = info.mpp
        self.plan = plan
        self.input_size = int(input_size or plan.input_size)
        self.threads = int(threads or min(4, os.cpu_count() or 1))
        self._level: _TiffLevel | None = None
        if info.vendor in _FAST_VENDORS:  # formats whose OpenSlide level-0 frame is tifffile's first series
            self._level = self._try_fast(info.level_sizes_wh[plan.level])
        if self._level is not None and self._level.jpeg and scaled_decode:
            self._level.set_scale(_decode_scale(plan, self.input_size, self._level.tile_wh))
        self._cache = _TileCache(cache_bytes)
        self._local = threading.local()
        self._handles: list[Any] = []
        self._handles_lock = threading.Lock()
        self._procs: Any = None  # service._procreader.ProcessTileReading when decoding runs in processes
        if processes and self._level is not None:
            from service._procreader import ProcessTileReading

            try:
                self._procs = ProcessTileReading(self, processes, cache_bytes)
            except BaseException:
                self._level.close()
                raise
        elif processes:  # read_region through OpenSlide releases the GIL: threads scale there
            self.threads = max(self.threads, processes)
        self.processes = processes if self._procs is not None else 0
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tile-reader")
        logger.info("tile reader: %s path, %s, %d tiles", "direct TIFF" if self.fast else "read_region",
                    f"{self.processes} processes" if self.processes else f"{self.threads} threads", len(plan))

    @property
    def decode_scale(self) -> int:
        """1, or 2/4/8 when JPEG tiles are decoded at reduced size (plan reads at least that many times S)."""
        return self._level.scale if self._level is not None else 1

    @property
    def fast(self) -> bool:
        """Whether tiles are decoded directly from the TIFF (else through Slide.read_region)."""
        return self._level is not None

    def _try_fast(self, level_wh: tuple[int, int]) -> _TiffLevel | None:
        """The direct TIFF path when the file and level allow it, else None."""
        if not isinstance(self._path, Path) and "://" in str(self._path):
            return None
        path = Path(self._path)
        if not path.is_file():
            return None
        with path.open("rb") as fh:
            if fh.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        try:
            return _TiffLevel(path, self.plan.level, level_wh)
        except SlideError as err:
            logger.info("tile reader falls back to read_region for %s: %s", path.name, err)
            return None

    def _thread_handle(self) -> Any:
        """This thread's file descriptor (fast path) or Slide (fallback)."""
        handle = getattr(self._local, "handle", None)
        if handle is None:
            if self._level is not None:
                handle = os.open(self._path, os.O_RDONLY)
            else:
                handle = open_slide(self._path, mpp_override=self._mpp)
            self._local.handle = handle
            with self._handles_lock:
                self._handles.append(handle)
        return handle

    def _read_into(self, out: np.ndarray, slot: int, t_index: int) -> None:
        """Read plan tile `t_index`, resized to the input size, into `out[slot]`; TileReadError on failure."""
        try:
            self._read_tile(out, slot, t_index)
        except TileReadError:
            raise
        except Exception as err:  # decoders and backends raise many types; name the tile and keep the cause
            xy = self.plan.l0_xy[t_index].tolist()
            raise TileReadError(t_index, f"tile {t_index} at level-0 {xy} could not be read ({err}); the slide "
                                         f"file may be damaged") from err

    def _read_tile(self, out: np.ndarray, slot: int, t_index: int) -> None:
        """Read plan tile `t_index`, resized to the input size, into `out[slot]`."""
        l0_x, l0_y = (int(v) for v in self.plan.l0_xy[t_index])
        size = self.plan.lvl_tile_size
        handle = self._thread_handle()
        if self._level is not None:
            out[slot] = _fast_tile(self._level, handle, self._cache, (l0_x, l0_y), size,
                                   self.plan.level_downsample, self.input_size)
        else:
            region = handle.read_region((l0_x, l0_y), self.plan.level, (size, size))
            out[slot] = _resize(region, self.input_size)

    def _submit(self, indices: Sequence[int]) -> tuple[np.ndarray, list[Future[None]]]:
        """Start reading `indices` into a new (n, S, S, 3) array."""
        out = np.empty((len(indices), self.input_size, self.input_size, 3), np.uint8)
        futures = [self._pool.submit(self._read_into, out, slot, int(i)) for slot, i in enumerate(indices)]
        return out, futures

    def read(self, indices: Iterable[int]) -> np.ndarray:
        """Plan tiles `indices` as uint8 (n, S, S, 3), read in parallel."""
        if self._procs is not None:
            return self._procs.read(indices)
        out, futures = self._submit(list(indices))
        for fut in futures:
            fut.result()
        return out

    def iter_batches(self, indices: Iterable[int], batch_size: int, prefetch: int = 2
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices (n,), tiles (n, S, S, 3)) in order, keeping `prefetch` batches in flight ahead."""
        if self._procs is not None:
            yield from self._procs.iter_batches(indices, batch_size, prefetch)
            return
        order = np.asarray(list(indices), np.int64)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        pending: deque[tuple[np.ndarray, np.ndarray, list[Future[None]]]] = deque()
        next_batch = 0
        try:
            while pending or next_batch < len(batches):
                while next_batch < len(batches) and len(pending) <= prefetch:
                    idx = batches[next_batch]
                    pending.append((idx, *self._submit(idx.tolist())))
                    next_batch += 1
                idx, tiles, futures = pending.popleft()
                for fut in futures:
                    fut.result()
                yield idx, tiles
        finally:
            for _, _, futures in pending:
                for fut in futures:
                    fut.cancel()

    def close(self) -> None:
        """Stop the pool (and worker processes, releasing their shared memory) and every per-thread handle."""
        if self._procs is not None:
            self._procs.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._handles_lock:
            for handle in self._handles:
                if isinstance(handle, int):
                    os.close(handle)
                else:
                    handle.close()
            self._handles.clear()
        if self._level is not None:
            self._level.close()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
