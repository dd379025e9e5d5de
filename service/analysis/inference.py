"""Inference over plan tiles: full batches from the prefetching TileReader into one long-lived predictor.

Planes: `t_` tile indices into the job's plan; model inputs are (B, S, S, 3) uint8, outputs class_probs (B, C)
and fg_prob (B, S/k, S/k). Decoding runs on the reader's threads while the predictor computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from model.runtime import DensePrediction, ModelMetadata, Prediction
from service.analysis.chunks import ChunkOutput, PipelineError
from service.analysis.plan import JobPlan
from service.slide.tile_reader import TileReader
from service.slide.wsi import Slide

__all__ = ["TilePredictor", "infer_in_chunks", "plan_reader", "run_chunk"]

logger = logging.getLogger(__name__)


class TilePredictor(Protocol):
    """What the pipeline needs of a predictor (`model.runtime.Predictor` or a wrapper of it); `predict_dense`
    only for dense plans (format_version 2 models)."""

    metadata: ModelMetadata

    def predict(self, tiles: np.ndarray) -> Prediction: ...

    def predict_dense(self, regions: np.ndarray) -> DensePrediction: ...


def plan_reader(slide: Slide, plan: JobPlan) -> TileReader:
    """The reader the plan asks for: of its tiles, or (dense plans) of its regions' reading squares; on
    threads, or worker processes with `reader_processes`."""
    regions = plan.region_plan
    return TileReader(
        slide, plan.tiles if regions is None else regions.reads, threads=plan.options.reader_threads,
        processes=plan.options.reader_processes,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _tiles_of_regions(
    plan: JobPlan, r_indices: np.ndarray, pred: DensePrediction
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a batch of region outputs into their kept tiles: (tile indices, class_probs (n, C), fg (n, fm, fm)).

    A tile's fg map is its window of the region core; its class probabilities are the softmax of the class
    logits averaged over that window (what a GAP + linear head gives a tile, with the region as context).
    """
    regions = plan.region_plan
    assert regions is not None
    fm = plan.fm_size
    off = regions.halo_in // int(plan.model["output_stride"])
    ranges = regions.tile_ranges()
    t_all = np.concatenate([np.arange(ranges[r].start, ranges[r].stop) for r in r_indices])
    n_classes = pred.class_logits.shape[1]
    probs = np.empty((t_all.size, n_classes), np.float32)
    fg = np.empty((t_all.size, fm, fm), np.float32)
    row = 0
    for b, r in enumerate(r_indices):
        for t in ranges[r]:
            cx, cy = regions.t_cell_xy[t]
            y0, x0 = off + int(cy) * fm, off + int(cx) * fm
            fg[row] = pred.fg_prob[b, y0 : y0 + fm, x0 : x0 + fm]
            probs[row] = pred.class_logits[b, :, y0 : y0 + fm, x0 : x0 + fm].mean(axis=(1, 2))
            row += 1
    return t_all, _softmax(probs), fg


def _dense_batches(
    reader: TileReader, plan: JobPlan, predictor: TilePredictor, r_indices: Sequence[int]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """(tile indices, class_probs, fg, predict seconds) per model call over the given regions, in order.

    Regions differ in size, so the model runs on one region per call: its part of the square the reader read
    (the reader keeps the next squares decoding meanwhile).
    """
    regions = plan.region_plan
    assert regions is not None
    for idx, batch in reader.iter_batches(r_indices, 1):
        r = int(idx[0])
        w, h = regions.crop_in_wh(r)
        t1 = time.perf_counter()
        pred = predictor.predict_dense(np.ascontiguousarray(batch[:, :h, :w]))
        dt = time.perf_counter() - t1
        yield (*_tiles_of_regions(plan, np.asarray([r], np.int64), pred), dt)


def _tile_outputs(
    reader: TileReader, plan: JobPlan, predictor: TilePredictor, indices: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """(class_probs (n, C), fg (n, fm, fm), predict seconds) per model call, in the order of `indices`.

    Tile plans call the model on full batches of tiles; dense plans on batches of whole regions, which
    `indices` must then cover exactly (chunks of a dense plan are runs of whole regions).
    """
    regions = plan.region_plan
    if regions is None:
        for _, batch in reader.iter_batches(indices, plan.options.batch_size):
            t1 = time.perf_counter()
            pred = predictor.predict(batch)
            yield pred.class_probs, pred.fg_prob, time.perf_counter() - t1
        return
    r_indices = np.unique(regions.t_region[indices]) if indices.size else np.zeros(0, np.int64)
    ranges = regions.tile_ranges()
    covered = np.concatenate([np.arange(ranges[r].start, ranges[r].stop) for r in r_indices]) \
        if r_indices.size else np.zeros(0, np.int64)
    if not np.array_equal(covered, indices):
        raise PipelineError(f"tiles {indices[:1].tolist()}..{indices[-1:].tolist()} do not cover whole regions "
                            "of this dense plan; take chunk ranges from JobPlan.chunks()")
    for _, probs, fg, dt in _dense_batches(reader, plan, predictor, r_indices.tolist()):
        yield probs, fg, dt


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

    Batches are full (`options.batch_size` tiles, or whole regions for a dense plan) except the chunk's last.
    Pass a long-lived `reader` (from `plan_reader`) to share its threads and tile cache across chunks;
    otherwise one is opened for this chunk.
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
        outputs = _tile_outputs(active, plan, predictor, indices) if active is not None else iter(())
        for probs, maps, dt in outputs:
            infer_s += dt
            n = probs.shape[0]
            class_probs[done : done + n] = probs
            fg[done : done + n] = maps
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
    for batch_probs, batch_fg, dt in _tile_outputs(reader, plan, predictor, np.arange(len(plan), dtype=np.int64)):
        n, pos = batch_probs.shape[0], 0
        while pos < n:
            take = min(n - pos, len(chunks[c]) - filled)
            probs[filled : filled + take] = batch_probs[pos : pos + take]
            fg[filled : filled + take] = batch_fg[pos : pos + take]
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
