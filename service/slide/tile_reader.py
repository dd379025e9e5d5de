"""Plan tiles in, uint8 (n, S, S, 3) model inputs out, decoded in parallel ahead of inference.

For TIFF-family slides (SVS, generic tiled TIFF) whose plan level is a tiled 8-bit RGB/YCbCr page, tiles go
through the direct TIFF path of `service.slide.tiff_decode` (on threads, or on worker processes through
`service.slide.tile_reader_procs`). Everything else goes through `Slide.read_region` with one slide handle
per thread. Planes: `l0_` level-0 pixels, `lvl_` pixels
of the plan's level, `in_` model-input pixels (S = input size).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service.slide.errors import SlideError, TileReadError
from service.slide.tiff_decode import (
    CACHE_BYTES,
    FAST_VENDORS,
    TiffLevel,
    decode_scale,
    read_fast_tile,
    resize_square,
    source_tile_cache,
)
from service.slide.tile_reader_procs import ProcessTileReading
from service.slide.tiling import TilePlan
from service.slide.wsi import Slide, open_slide

__all__ = ["TileReadError", "TileReader"]

logger = logging.getLogger(__name__)

class TileReader:
    """Reads plan tiles as model inputs; `iter_batches` prefetches on a thread pool so decoding overlaps compute."""

    def __init__(self, slide_path_or_slide: str | Path | Slide, plan: TilePlan, input_size: int | None = None,
                 threads: int | None = None, cache_bytes: int = CACHE_BYTES, scaled_decode: bool = True,
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
        self._level: TiffLevel | None = None
        if info.vendor in FAST_VENDORS:
            self._level = self._try_fast(info.level_sizes_wh[plan.level])
        if self._level is not None and self._level.jpeg and scaled_decode:
            self._level.set_scale(decode_scale(plan, self.input_size, self._level.tile_wh))
        self._cache = source_tile_cache(cache_bytes)
        self._local = threading.local()
        self._handles: list[Any] = []
        self._handles_lock = threading.Lock()
        self._procs: ProcessTileReading | None = None  # set when decoding runs in worker processes
        if processes and self._level is not None:
            try:
                self._procs = ProcessTileReading(self._path, self._level, plan, self.input_size, processes,
                                                 cache_bytes)
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
    def process_reading(self) -> ProcessTileReading | None:
        """The worker processes decoding tiles (with `processes=N` on the direct TIFF path), else None."""
        return self._procs

    @property
    def open_handles(self) -> int:
        """Per-thread file descriptors or slides opened so far (one per reading thread at most)."""
        with self._handles_lock:
            return len(self._handles)

    @property
    def fast(self) -> bool:
        """Whether tiles are decoded directly from the TIFF (else through Slide.read_region)."""
        return self._level is not None

    def _try_fast(self, level_wh: tuple[int, int]) -> TiffLevel | None:
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
            return TiffLevel(path, self.plan.level, level_wh)
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
            out[slot] = read_fast_tile(self._level, handle, self._cache, (l0_x, l0_y), size,
                                   self.plan.level_downsample, self.input_size)
        else:
            region = handle.read_region((l0_x, l0_y), self.plan.level, (size, size))
            out[slot] = resize_square(region, self.input_size)

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
