"""Process-based reading for TileReader's direct TIFF path: decoding scales with cores instead of the GIL.

N worker processes (forkserver, else spawn; never fork: the parent holds onnxruntime, torch and server threads)
each open the slide file themselves, keep their own decoded-tile cache, and decode contiguous runs of plan tiles,
resized to the input size, straight into shared-memory batch slots: no pixels are pickled. The parent yields
zero-copy views of the slots; a slot is reused only once every array derived from the batch it held is gone
(tracked through a weak reference), so a consumer that keeps batches never sees them overwritten. `close()`
stops the workers, then unlinks every segment; a mapping still viewed by the consumer lives until that view dies.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from service.slide.errors import TileReadError
from service.slide.tiff_decode import TiffLevel, read_fast_tile, source_tile_cache
from service.slide.tiling import TilePlan

__all__ = ["ProcessTileReading"]

logger = logging.getLogger(__name__)

MIN_RUN = 4  # fewest tiles per worker task: neighbours share decoded source tiles through the worker's cache
READ_BATCH = 64  # tiles per batch when `read` goes through the processes

# --- worker side (one set per worker process) ---------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(
    path: str, level: int, level_wh: tuple[int, int], scale: int, params: dict[str, Any]
) -> None:
    """Open the slide level, a file descriptor and a private tile cache; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tiff = TiffLevel(Path(path), level, level_wh)
    tiff.set_scale(scale)
    _worker.update(
        level=tiff,
        fd=os.open(path, os.O_RDONLY),
        cache=source_tile_cache(params["cache_bytes"]),
        segments={},
        **params,
    )


def _ping(delay_s: float = 0.0) -> int:
    """A task that makes the pool start a worker now (and, with a delay, keeps that worker busy a moment)."""
    time.sleep(delay_s)
    return os.getpid()


def _read_run(
    segment: str, capacity: int, entries: Sequence[tuple[int, int, int, int]]
) -> tuple[int, str] | None:
    """Decode (slot position, tile index, level-0 x, y) entries into the segment; (tile, reason) of a failure."""
    w = _worker
    shm = w["segments"].get(segment)
    if shm is None:
        shm = w["segments"][segment] = SharedMemory(segment)
    s = w["input_size"]
    out = np.ndarray((capacity, s, s, 3), np.uint8, buffer=shm.buf)
    for pos, t_index, l0_x, l0_y in entries:
        try:
            out[pos] = read_fast_tile(
                w["level"], w["fd"], w["cache"], (l0_x, l0_y), w["lvl_tile_size"], w["level_downsample"], s
            )
        except Exception as err:  # decoders raise many types; the parent names the tile
            return t_index, str(err)
    return None


# --- parent side ------------------------------------------------------------------------------------------------
class _Batch:
    """Keeps a slot's mapping alive for as long as any array of one yielded batch exists (numpy's base)."""

    def __init__(self, shm: SharedMemory, address: int, shape: tuple[int, ...]) -> None:
        self._shm = shm
        self.__array_interface__ = {"shape": shape, "typestr": "|u1", "data": (address, False), "version": 3}


class _Slot:
    """One shared-memory segment of `capacity` model inputs, reused batch after batch."""

    def __init__(self, capacity: int, tile_shape: tuple[int, int, int]) -> None:
        nbytes = capacity * int(np.prod(tile_shape))
        self.shm = SharedMemory(create=True, size=nbytes)
        try:
            if hasattr(os, "posix_fallocate") and hasattr(self.shm, "_fd"):
                # reserve the pages now: a full /dev/shm is an error here, not a SIGBUS in a worker later
                os.posix_fallocate(self.shm._fd, 0, nbytes)
        except OSError as err:
            self.release()
            raise OSError(
                err.errno,
                f"cannot reserve {nbytes / 2**20:.1f} MiB of shared memory for the tile "
                f"reader ({err.strerror}); give /dev/shm more room (Docker: shm_size) or "
                f"use reader_processes=0",
            ) from err
        buf = self.shm.buf
        assert buf is not None  # set until close()
        view = np.frombuffer(buf, np.uint8)
        self.address = int(view.ctypes.data)
        del view  # no buffer export may outlive this: the parent's mapping closes through the SharedMemory
        self.capacity = capacity
        self.tile_shape = tile_shape
        self.futures: list[Future[Any]] = []
        self.reserved = False  # taken by a batch that is submitted but not yet yielded
        self._yielded: weakref.ref[_Batch] | None = None

    @property
    def name(self) -> str:
        return self.shm.name

    def in_use(self) -> bool:
        """Whether a worker may still write here or the consumer still holds the last batch read here."""
        held = self._yielded is not None and self._yielded() is not None
        return self.reserved or held or not all(f.done() for f in self.futures)

    def batch(self, n: int) -> np.ndarray:
        """The first `n` inputs as an array that keeps the mapping alive; marks the slot held until it is gone."""
        holder = _Batch(self.shm, self.address, (n, *self.tile_shape))
        self._yielded = weakref.ref(holder)
        self.reserved = False
        return np.asarray(holder)

    def release(self) -> None:
        """Unlink the segment; unmap it now unless a yielded batch still views it (then it unmaps with that)."""
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()
        if self._yielded is None or self._yielded() is None:
            self.shm.close()


def _context() -> multiprocessing.context.BaseContext:
    """forkserver (workers fork from a clean single-threaded server, quick to start) where there is one, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["service.slide.tiff_decode", "service.slide.tile_reader_procs"])
        return ctx
    return multiprocessing.get_context("spawn")


class ProcessTileReading:
    """The process pool and shared-memory slots behind `TileReader(processes=N)` on the direct TIFF path."""

    def __init__(self, path: str | Path, level: TiffLevel, plan: TilePlan, input_size: int, processes: int,
                 cache_bytes: int) -> None:
        self.processes = processes
        self._plan = plan
        self._xy = np.asarray(plan.l0_xy, np.int64)
        s = input_size
        self._tile_shape = (s, s, 3)
        params = {
            "cache_bytes": cache_bytes,
            "input_size": s,
            "lvl_tile_size": int(plan.lvl_tile_size),
            "level_downsample": float(plan.level_downsample),
        }
        self._slots: list[_Slot] = []
        self._pool = ProcessPoolExecutor(
            processes,
            mp_context=_context(),
            initializer=_init_worker,
            initargs=(str(path), plan.level, level.size_wh, level.scale, params),
        )
        # start every worker now (each submit with no idle worker starts one), so start-up overlaps the caller's
        # own preparations instead of the first batch
        self._started = [self._pool.submit(_ping) for _ in range(processes)]

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Block until every worker has opened the slide; seconds waited (a pool that cannot start raises)."""
        t0 = time.perf_counter()
        seen: set[int] = set()
        while len(seen) < self.processes:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(
                    f"{len(seen)} of {self.processes} tile reader processes started in {timeout_s} s"
                )
            # one short sleep per worker: a ready worker that is asleep cannot take a second ping
            seen.update(f.result() for f in [self._pool.submit(_ping, 0.02) for _ in range(self.processes)])
        return time.perf_counter() - t0

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers."""
        return sorted((self._pool._processes or {}).keys())

    def segment_names(self) -> list[str]:
        """Names of the shared-memory segments currently held."""
        return [slot.name for slot in self._slots]

    def _slot_for(self, n: int) -> _Slot:
        for slot in self._slots:
            if slot.capacity >= n and not slot.in_use():
                slot.reserved = True
                return slot
        slot = _Slot(n, self._tile_shape)
        slot.reserved = True
        self._slots.append(slot)
        if len(self._slots) > 8:
            logger.debug(
                "tile reader holds %d shared-memory batches (the consumer keeps batches)", len(self._slots)
            )
        return slot

    def _submit(self, indices: np.ndarray) -> tuple[np.ndarray, _Slot, list[tuple[Future[Any], int]]]:
        """Split the batch into contiguous runs, one task each, decoding into a free slot."""
        n = len(indices)
        slot = self._slot_for(n)
        runs = max(1, min(self.processes, n // MIN_RUN))
        bounds = [i * n // runs for i in range(runs + 1)]
        xy = self._xy[indices] if n else np.zeros((0, 2), np.int64)
        tasks: list[tuple[Future[Any], int]] = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            entries = [(pos, int(indices[pos]), int(xy[pos, 0]), int(xy[pos, 1])) for pos in range(a, b)]
            if entries:
                tasks.append(
                    (self._pool.submit(_read_run, slot.name, slot.capacity, entries), int(indices[a]))
                )
        slot.futures = [fut for fut, _ in tasks]
        return indices, slot, tasks

    def _wait(self, tasks: list[tuple[Future[Any], int]]) -> None:
        """Wait for a batch's runs in order; TileReadError naming the first tile that failed."""
        for fut, first in tasks:
            try:
                failed = fut.result()
            except BrokenProcessPool as err:
                raise TileReadError(
                    first,
                    f"the tile reader's worker process for tiles from {first} on died or "
                    f"could not open the slide ({err})",
                ) from err
            if failed is not None:
                t_index, reason = failed
                xy = self._xy[t_index].tolist()
                raise TileReadError(
                    t_index,
                    f"tile {t_index} at level-0 {xy} could not be read ({reason}); the "
                    f"slide file may be damaged",
                )

    def iter_batches(
        self, indices: Iterable[int], batch_size: int, prefetch: int = 2
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """TileReader.iter_batches on the processes: same order, prefetch and errors; batches are slot views."""
        order = np.asarray(list(indices), np.int64)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        pending: deque[tuple[np.ndarray, _Slot, list[tuple[Future[Any], int]]]] = deque()
        next_batch = 0
        try:
            while pending or next_batch < len(batches):
                while next_batch < len(batches) and len(pending) <= prefetch:
                    pending.append(self._submit(batches[next_batch]))
                    next_batch += 1
                idx, slot, tasks = pending.popleft()
                try:
                    self._wait(tasks)
                except BaseException:
                    slot.reserved = False
                    raise
                tiles = slot.batch(len(idx))
                yield idx, tiles
                del tiles  # this frame must not keep the slot held
        finally:
            for _, slot, tasks in pending:
                for fut, _ in tasks:
                    fut.cancel()
                slot.reserved = False  # free again once its running tasks are done

    def read(self, indices: Iterable[int]) -> np.ndarray:
        """TileReader.read on the processes: a private (n, S, S, 3) array."""
        order = list(indices)
        out = np.empty((len(order), *self._tile_shape), np.uint8)
        pos = 0
        for _, tiles in self.iter_batches(order, READ_BATCH):
            out[pos : pos + len(tiles)] = tiles
            pos += len(tiles)
        return out

    def close(self) -> None:
        """Stop the workers (waiting for tasks already running), then unlink every segment."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for slot in self._slots:
                slot.release()
            self._slots.clear()
