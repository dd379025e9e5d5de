"""Chunk files of a job folder: atomic writes, an index of which tiles are present, and a bounded-memory loader.

Planes: `t_` tile indices into the job's plan. A chunk file `chunks/chunk-<id>.npz` holds the tile indices it
covers, class probabilities (n, C) float32, foreground maps (n, h, w) float16 and per-tile timings. Redoing a
chunk rewrites the same file, so a chunk run twice is harmless.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.lru import LRUCache
from service.outputs.stitching import sample_mask

__all__ = [
    "CHUNKS_DIR",
    "TISSUE_FILE",
    "TissueGate",
    "ChunkIndex",
    "ChunkOutput",
    "PipelineError",
    "chunk_files",
    "load_chunk",
    "save_chunk",
]

logger = logging.getLogger(__name__)

CHUNKS_DIR = "chunks"
TISSUE_FILE = "tissue.png"
_CHUNK_RE = re.compile(r"^chunk-(\d+)\.npz$")
_CACHED_CHUNKS = 4  # bands walk the plan top to bottom, so a few recent chunks are all a band needs


class PipelineError(RuntimeError):
    """A job folder or chunk output that the pipeline cannot use."""


@dataclass(frozen=True)
class ChunkOutput:
    """The model outputs of one chunk: class_probs (n, C), fg_prob (n, h, w), for plan tiles `tile_indices`."""

    class_probs: np.ndarray
    fg_prob: np.ndarray
    tile_indices: np.ndarray | None = None
    read_s: float = 0.0
    infer_s: float = 0.0
    wall_s: float = 0.0

    def __len__(self) -> int:
        return int(self.class_probs.shape[0])


def chunk_path(job_dir: str | os.PathLike[str], chunk_id: int) -> Path:
    """Where chunk `chunk_id` of a job lives."""
    return Path(job_dir) / CHUNKS_DIR / f"chunk-{int(chunk_id):06d}.npz"


def save_chunk(job_dir: str | os.PathLike[str], chunk_id: int, out: ChunkOutput) -> Path:
    """Write one chunk atomically (temporary file, then rename); rewriting a chunk replaces it."""
    if out.tile_indices is None or len(out.tile_indices) != len(out):
        raise PipelineError(
            f"chunk {chunk_id} must name the plan tiles of its {len(out)} outputs in tile_indices "
            "(run_chunk fills it)"
        )
    if out.fg_prob.shape[0] != len(out):
        raise PipelineError(f"chunk {chunk_id}: {len(out)} class rows but {out.fg_prob.shape[0]} fg maps")
    path = chunk_path(job_dir, chunk_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(
            fh,
            tile_indices=np.asarray(out.tile_indices, np.int64),
            class_probs=np.asarray(out.class_probs, np.float32),
            fg_prob=np.asarray(out.fg_prob, np.float16),
            timings=np.array([out.read_s, out.infer_s, out.wall_s], np.float64),
        )
    os.replace(tmp, path)
    return path


def load_chunk(path: str | os.PathLike[str]) -> ChunkOutput:
    """Read one chunk file back."""
    try:
        with np.load(path) as data:
            read_s, infer_s, wall_s = (float(v) for v in data["timings"])
            return ChunkOutput(
                class_probs=data["class_probs"],
                fg_prob=data["fg_prob"].astype(np.float32),
                tile_indices=data["tile_indices"],
                read_s=read_s,
                infer_s=infer_s,
                wall_s=wall_s,
            )
    except (OSError, KeyError, ValueError) as err:
        raise PipelineError(
            f"chunk file {path} is unreadable ({err}); delete it and run that chunk again"
        ) from err


def chunk_files(job_dir: str | os.PathLike[str]) -> list[Path]:
    """The chunk files present, in chunk order (temporary files of writes in progress are skipped)."""
    folder = Path(job_dir) / CHUNKS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHUNK_RE.match(p.name))


@dataclass(frozen=True)
class TissueGate:
    """Zeroes the fg cells of tiles whose centres fall off the tissue mask (glass, white background, or past the
    slide's edge), so that everything built from the chunk files (heatmap, evidence, regions, GeoJSON tile means,
    live partial heatmaps) says nothing on glass. Planes: `l0_` level-0 px, mask px = `l0_per_px` level-0 px."""

    mask: np.ndarray  # (h, w) bool
    l0_per_px: float
    l0_xy: np.ndarray  # (N, 2) the plan's tile corners
    l0_tile_size: float
    l0_size_wh: tuple[int, int]

    def _cells(self, tiles: np.ndarray, fm: int) -> tuple[np.ndarray, np.ndarray]:
        centres = (np.arange(fm) + 0.5) * self.l0_tile_size / fm
        return self.l0_xy[tiles, 1, None] + centres, self.l0_xy[tiles, 0, None] + centres  # (n, fm) rows, cols

    def apply(self, tiles: np.ndarray, fg: np.ndarray) -> np.ndarray:
        """fg (n, fm, fm) of `tiles` with the cells off the tissue at 0."""
        if fg.ndim != 3 or tiles.size == 0:
            return fg
        l0_y, l0_x = self._cells(tiles, fg.shape[1])
        return np.where(sample_mask(self.mask, self.l0_per_px, l0_y, l0_x), fg, np.float32(0.0)).astype(np.float32)

    def cells_on_slide(self, tiles: np.ndarray, fm: int) -> np.ndarray:
        """(n,) how many of each tile's fm x fm cells have their centre on the slide."""
        l0_y, l0_x = self._cells(tiles, fm)
        w, h = self.l0_size_wh
        return (l0_y < h).sum(axis=1) * (l0_x < w).sum(axis=1)


class ChunkIndex:
    """Which chunk file holds each tile, plus the small per-tile outputs (class probabilities, fg mean).

    With a `gate`, every fg map it hands out is gated, and a tile's fg mean is over its cells on the slide.
    """

    def __init__(self, job_dir: str | os.PathLike[str], n_tiles: int, n_classes: int,
                 gate: TissueGate | None = None) -> None:
        self.gate = gate
        self.paths = chunk_files(job_dir)
        self._tiles_of: list[np.ndarray] = []
        self.chunk_of = np.full(n_tiles, -1, np.int64)
        self.row_of = np.zeros(n_tiles, np.int64)
        self.class_probs = np.zeros((n_tiles, n_classes), np.float32)
        self.fg_mean = np.zeros(n_tiles, np.float32)
        self.timings = np.zeros(3)
        self._cache: LRUCache[int, np.ndarray] = LRUCache(max_items=_CACHED_CHUNKS)
        for c, path in enumerate(self.paths):
            out = load_chunk(path)
            t = np.asarray(out.tile_indices)
            if t.size and (t.min() < 0 or t.max() >= n_tiles):
                raise PipelineError(
                    f"{path.name} names tiles outside the plan of {n_tiles}; was it from another job?"
                )
            self._tiles_of.append(t)
            self.chunk_of[t] = c
            self.row_of[t] = np.arange(t.size)
            self.class_probs[t] = out.class_probs
            if t.size and gate is not None and out.fg_prob.ndim == 3:
                fm = out.fg_prob.shape[1]
                sums = gate.apply(t, out.fg_prob).reshape(t.size, -1).sum(axis=1)
                self.fg_mean[t] = sums / np.maximum(gate.cells_on_slide(t, fm), 1)
            elif t.size:
                self.fg_mean[t] = out.fg_prob.reshape(t.size, -1).mean(axis=1)
            self.timings += (out.read_s, out.infer_s, out.wall_s)

    @property
    def present(self) -> np.ndarray:
        """(N,) bool: tiles whose outputs are on disk."""
        return self.chunk_of >= 0

    def _fg_of_chunk(self, c: int) -> np.ndarray:
        fg = self._cache.get(c)
        if fg is None:
            fg = load_chunk(self.paths[c]).fg_prob
            if self.gate is not None:
                fg = self.gate.apply(self._tiles_of[c], fg)
            self._cache.put(c, fg)
        return fg

    def load_fg(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stitcher's loader: (tiles present among `indices`, their fg maps (n, h, w) float32)."""
        indices = np.asarray(indices, np.int64)
        kept = indices[self.chunk_of[indices] >= 0]
        if kept.size == 0:
            return kept, np.zeros((0, 1, 1), np.float32)
        maps = [self._fg_of_chunk(int(self.chunk_of[t]))[self.row_of[t]] for t in kept]
        return kept, np.stack(maps)
