"""The analysis core in one process: slide in; class, heatmap, overlay and QuPath GeoJSON out.

Planes: `l0_` level-0 slide pixels, `hm_` heatmap cells (`l0 = hm * hm_downsample`), `t_` tile indices into the
plan. The queue workers call the same pieces one message at a time: `plan.prepare_job`, `inference.run_chunk` +
`chunks.save_chunk`, then `finalize.finalize_job`; `analyze_slide` runs them in order
here. A job folder holds `plan.json`, `plan_tiles.npz`, `tissue.png` and `chunks/chunk-*.npz`; pixels never leave
the worker that read them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.analysis.chunks import ChunkIndex, save_chunk
from service.analysis.finalize import AnalysisResult, finalize_job
from service.analysis.inference import TilePredictor, infer_in_chunks, plan_reader
from service.analysis.plan import PLAN_FILE, AnalysisOptions, JobPlan, prepare_job
from service.outputs.stitching import stitch_bands
from service.slide.wsi import open_slide

__all__ = ["Progress", "analyze_slide", "partial_heatmap"]

logger = logging.getLogger(__name__)


def partial_heatmap(job_dir: str | os.PathLike[str]) -> tuple[np.ndarray, float] | None:
    """The heatmap (H, W) float32 from the chunk files present so far (NaN = not analysed yet), or None."""
    folder = Path(job_dir)
    if not (folder / PLAN_FILE).is_file():
        return None
    plan = JobPlan.load(folder)
    index = ChunkIndex(folder, len(plan), len(plan.model["classes"]), gate=plan.tissue_gate(folder))
    if not index.present.any():
        return None
    rows = [
        np.where(band.covered, band.prob, np.nan).astype(np.float32)
        for band in stitch_bands(plan.grid(), plan.l0_xy, plan.tiles.l0_tile_size, index.load_fg)
    ]
    return np.concatenate(rows), plan.hm_downsample


@dataclass(frozen=True)
class Progress:
    """Progress of one analysis in tissue tiles."""

    done: int
    total: int
    elapsed_s: float

    @property
    def tiles_per_s(self) -> float:
        """Throughput so far."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current throughput (None before the first tile)."""
        rate = self.tiles_per_s
        return (self.total - self.done) / rate if rate > 0 else None


def _infer_plan(
    slide_path: str | Path,
    plan: JobPlan,
    predictor: TilePredictor,
    work: Path,
    progress: Callable[[Progress], None] | None,
) -> None:
    """Every chunk of the plan through one reader and one predictor, saved into `work`, reporting progress."""
    t0 = time.perf_counter()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(Progress(done, len(plan), time.perf_counter() - t0))

    if progress is not None:
        progress(Progress(0, len(plan), 0.0))
    if not len(plan):
        return
    with (
        open_slide(slide_path, mpp_override=plan.options.mpp_override) as slide,
        plan_reader(slide, plan) as reader,
    ):
        for chunk_id, out_chunk in infer_in_chunks(reader, plan, predictor, tick):
            save_chunk(work, chunk_id, out_chunk)


def analyze_slide(
    slide_path: str | Path,
    predictor: TilePredictor,
    out_dir: str | os.PathLike[str],
    options: AnalysisOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
    *,
    model_sha256: str | None = None,
) -> AnalysisResult:
    """Analyse one slide in this process: plan, infer every chunk, finalize; writes the four result files."""
    options = options or AnalysisOptions()
    out = Path(out_dir)
    created = not out.exists()
    work = out / ".pixelcam-work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        plan = prepare_job(slide_path, predictor.metadata, options, work)
        _infer_plan(slide_path, plan, predictor, work, progress)
        sha = model_sha256 or getattr(predictor, "sha256", None) or "unknown"
        result = finalize_job(work, plan, predictor.metadata, sha, out_dir=out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed analysis leaves no empty folder behind
    return result
