"""Inference over plan tiles: full batches from the prefetching TileReader into one long-lived predictor.

Planes: `t_` tile indices into the job's plan; model inputs are (B, S, S, 3) uint8, outputs class_probs (B, C)
and fg_prob (B, S/k, S/k). Decoding runs on the reader's threads while the predictor computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from model.runtime import ModelMetadata, Prediction
from service.analysis.chunks import ChunkOutput, PipelineError
from service.analysis.plan import JobPlan
from service.slide.tile_reader import TileReader
from service.slide.wsi import Slide

__all__ = ["TilePredictor", "infer_in_chunks", "plan_reader", "run_chunk"]

logger = logging.getLogger(__name__)


class TilePredictor(Protocol):
    """What the pipeline needs of a predictor (`model.runtime.Predictor` or a wrapper of it)."""

    metadata: ModelMetadata

    def predict(self, tiles: np.ndarray) -> Prediction: ...


def plan_reader(slide: Slide, plan: JobPlan) -> TileReader:
    """The tile reader the plan's options ask for (threads, or worker processes with `reader_processes`)."""
    return TileReader(
        slide, plan.tiles, threads=plan.options.reader_threads, processes=plan.options.reader_processes
    )


def run_chunk(
    slide: Slide,
    plan: JobPlan,
    tile_indices: range | np.ndarray,
    predictor: TilePredictor,
    *,
    on_batch: Callable[[int], None] | None = None,
    reader: TileReader | None = None,
) -> ChunkOutput:
    """Read, decode and predict the given plan tiles with one predictor; decoding overlaps inference.

    Batches are full (`options.batch_size`) except the chunk's last. Pass a long-lived `reader` to share its
    threads and tile cache across chunks; otherwise one is opened for this chunk.
    """
    t0 = time.perf_counter()
    indices = np.asarray(tile_indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(plan)):
        raise PipelineError(
            f"tile indices {indices.min()}..{indices.max()} are outside the plan of {len(plan)}"
        )
    n_classes = len(plan.model["classes"])
    class_probs = np.zeros((indices.size, n_classes), np.float32)
    fg = np.zeros((indices.size, plan.fm_size, plan.fm_size), np.float32)
    done, infer_s = 0, 0.0
    own = reader is None and indices.size > 0  # no reader is opened for an empty chunk
    active = plan_reader(slide, plan) if own else reader
    try:
        for _, batch in active.iter_batches(indices, plan.options.batch_size) if active is not None else ():
            t1 = time.perf_counter()
            pred = predictor.predict(batch)
            infer_s += time.perf_counter() - t1
            n = batch.shape[0]
            class_probs[done : done + n] = pred.class_probs
            fg[done : done + n] = pred.fg_prob
            done += n
            if on_batch is not None:
                on_batch(n)
    finally:
        if own and active is not None:
            active.close()
    if done != indices.size:
        raise PipelineError(f"the reader returned {done} of {indices.size} tiles; the slide may be truncated")
    wall_s = time.perf_counter() - t0
    return ChunkOutput(
        class_probs, fg, indices, read_s=max(0.0, wall_s - infer_s), infer_s=infer_s, wall_s=wall_s
    )


def infer_in_chunks(
    reader: TileReader, plan: JobPlan, predictor: TilePredictor, on_batch: Callable[[int], None]
) -> Iterator[tuple[int, ChunkOutput]]:
    """Every plan tile as one stream of full batches (no refill bubble between chunks), cut into the plan's chunks."""
    chunks = plan.chunks()
    n_classes, fm = len(plan.model["classes"]), plan.fm_size
    c, filled, infer_s, t_chunk = 0, 0, 0.0, time.perf_counter()
    probs = np.zeros((len(chunks[0]), n_classes), np.float32)
    fg = np.zeros((len(chunks[0]), fm, fm), np.float32)
    for _, batch in reader.iter_batches(range(len(plan)), plan.options.batch_size):
        t1 = time.perf_counter()
        pred = predictor.predict(batch)
        dt, n, pos = time.perf_counter() - t1, batch.shape[0], 0
        while pos < n:
            take = min(n - pos, len(chunks[c]) - filled)
            probs[filled : filled + take] = pred.class_probs[pos : pos + take]
            fg[filled : filled + take] = pred.fg_prob[pos : pos + take]
            filled, pos, infer_s = filled + take, pos + take, infer_s + dt * take / n
            if filled == len(chunks[c]):
                wall_s = time.perf_counter() - t_chunk
                indices = np.asarray(chunks[c], np.int64)
                yield c, ChunkOutput(probs, fg, indices, max(0.0, wall_s - infer_s), infer_s, wall_s)
                c, filled, infer_s, t_chunk = c + 1, 0, 0.0, time.perf_counter()
                if c < len(chunks):
                    probs = np.zeros((len(chunks[c]), n_classes), np.float32)
                    fg = np.zeros((len(chunks[c]), fm, fm), np.float32)
        on_batch(n)
    if c != len(chunks):
        raise PipelineError(
            f"the reader stopped after chunk {c} of {len(chunks)}; the slide may be truncated"
        )
