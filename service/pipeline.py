"""The analysis core: slide in; class, heatmap, overlay and QuPath GeoJSON out, in one process or chunk by chunk.

Planes: `l0_` level-0 slide pixels, `hm_` heatmap cells (`l0 = hm * hm_downsample`), `t_` tile indices into the
plan. The queue workers call `prepare_job`, `run_chunk` + `save_chunk`, then `finalize_job`; `analyze_slide` runs
the same pieces in one process. A job folder holds `plan.json`, `plan_tiles.npz`, `tissue.png` and
`chunks/chunk-*.npz`; pixels never leave the worker that read them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from model.runtime import ModelMetadata
from service._finalize import AnalysisResult, finalize_job
from service._inference import TilePredictor, infer_in_chunks, plan_reader, run_chunk
from service._jobfiles import (
    TISSUE_FILE,
    ChunkIndex,
    ChunkOutput,
    PipelineError,
    load_chunk,
    save_chunk,
)
from service.slides import open_slide
from service.stitching import HeatmapGrid, stitch_bands
from service.tiling import TilePlan, detect_tissue, plan_tiles

__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "ChunkOutput",
    "JobPlan",
    "PipelineError",
    "Progress",
    "analyze_slide",
    "finalize_job",
    "load_chunk",
    "partial_heatmap",
    "prepare_job",
    "run_chunk",
    "save_chunk",
]

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TILES_FILE = "plan_tiles.npz"
PLAN_VERSION = 1


@dataclass(frozen=True)
class AnalysisOptions:
    """Parameters of one analysis; every one is recorded in the result's provenance."""

    # microns per level-0 pixel, when the slide's own value is missing or wrong
    mpp_override: float | None = None
    min_tissue: float = 0.1  # keep tiles with at least this tissue fraction
    overlap: float = 0.0  # fraction of a tile shared with its neighbour, in [0, 1)
    batch_size: int = 16
    chunk_size: int = 256  # tiles per chunk (queue message / progress step)
    hm_downsample: float | None = None  # l0 pixels per heatmap cell; None: one model output cell
    threshold: float | None = None  # foreground threshold; None: the model's fg_threshold
    blend: Literal["mean", "cosine"] = "mean"  # how overlapping tiles are averaged
    write_detections: bool = True  # QuPath tile objects with probabilities (measurement maps)
    simplify_hm: float = 0.5  # polygon simplification tolerance in heatmap cells
    min_region_cells: int = 4  # drop positive specks smaller than this many heatmap cells (GeoJSON only)
    reader_threads: int = 2
    reader_processes: int = 0  # > 0: decode TIFF tiles in processes (many cores + GPU; docs/analysis.md)
    geojson_gzip: bool = False
    hash_slide: bool = True  # SHA-256 of the slide file in the provenance (reads the whole file once)

    def __post_init__(self) -> None:
        """Refuse values that cannot work, saying what would."""
        if self.mpp_override is not None and not 0.01 <= self.mpp_override <= 100:
            raise ValueError(
                f"mpp_override must be in [0.01, 100] microns per pixel, got {self.mpp_override}"
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be a fraction in [0, 1], got {self.min_tissue}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1) (0.5 = half-tile steps), got {self.overlap}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.reader_threads < 1:
            raise ValueError("batch_size, chunk_size and reader_threads must be >= 1")
        if not isinstance(self.reader_processes, int) or self.reader_processes < 0:
            raise ValueError(
                f"reader_processes must be an integer >= 0 (0: threads), got {self.reader_processes!r}"
            )
        if self.hm_downsample is not None and not self.hm_downsample > 0:
            raise ValueError(f"hm_downsample must be > 0 level-0 pixels per cell, got {self.hm_downsample}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.blend not in ("mean", "cosine"):
            raise ValueError(f"blend must be 'mean' or 'cosine', got {self.blend!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisOptions:
        """Inverse of `to_dict`; unknown keys are refused."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown analysis options {unknown}")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class JobPlan:
    """Everything a worker needs to run any chunk of a job and to finalize it, saved in the job folder."""

    slide_path: str
    slide_info: dict[str, Any]
    slide_sha256: str | None
    tiles: TilePlan
    options: AnalysisOptions
    model: dict[str, Any]
    fm_size: int
    hm_downsample: float
    threshold: float
    l0_offset_xy: tuple[int, int]
    tissue_l0_per_px: float
    prepare_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def l0_xy(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left corners of the planned tiles."""
        return self.tiles.l0_xy

    def __len__(self) -> int:
        return len(self.tiles)

    def chunks(self, chunk_size: int | None = None) -> list[range]:
        """Tile index ranges of at most `chunk_size` tiles (default: the plan's), in plan order."""
        size = int(chunk_size or self.options.chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {size}")
        return [range(i, min(i + size, len(self))) for i in range(0, len(self), size)]

    def grid(self) -> HeatmapGrid:
        """The heatmap frame."""
        w, h = self.slide_info["l0_size_wh"]
        return HeatmapGrid((int(w), int(h)), self.hm_downsample)

    def save(self, job_dir: str | os.PathLike[str]) -> None:
        """Write plan.json (small values) and plan_tiles.npz (per-tile arrays), each atomically."""
        folder = Path(job_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tiles = self.tiles.to_dict()
        arrays = {k: np.asarray(getattr(self.tiles, k)) for k in ("l0_xy", "t_grid_xy", "tissue_fraction")}
        for k in arrays:
            tiles.pop(k)
        doc = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("tiles", "options")
        }
        doc.update(version=PLAN_VERSION, tiles=tiles, options=self.options.to_dict(), n_tiles=len(self))
        tmp = folder / f".{TILES_FILE}.tmp"
        with tmp.open("wb") as fh:
            np.savez(
                fh,
                l0_xy=arrays["l0_xy"],
                t_grid_xy=arrays["t_grid_xy"],
                tissue_fraction=arrays["tissue_fraction"],
            )
        os.replace(tmp, folder / TILES_FILE)
        tmp = folder / f".{PLAN_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, folder / PLAN_FILE)

    @classmethod
    def load(cls, job_dir: str | os.PathLike[str]) -> JobPlan:
        """Read a plan saved by `save`."""
        folder = Path(job_dir)
        try:
            doc = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
            with np.load(folder / TILES_FILE) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise PipelineError(
                f"no readable plan in {folder} ({err}); run prepare_job for this job first"
            ) from err
        if doc.pop("version", None) != PLAN_VERSION:
            raise PipelineError(
                f"the plan in {folder} was written by another pixelcam version; plan the job again"
            )
        doc.pop("n_tiles", None)
        tiles = TilePlan.from_dict({**doc.pop("tiles"), **arrays})
        options = AnalysisOptions.from_dict(doc.pop("options"))
        doc["l0_offset_xy"] = tuple(doc["l0_offset_xy"])
        return cls(tiles=tiles, options=options, **doc)


def file_sha256(path: str | os.PathLike[str], block_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def prepare_job(
    slide_path: str | Path,
    model_meta: ModelMetadata,
    options: AnalysisOptions,
    job_dir: str | os.PathLike[str],
    *,
    slide_sha256: str | None = None,
) -> JobPlan:
    """Open the slide, detect tissue, plan tiles at the model's scale, and save the plan in `job_dir`.

    Pass `slide_sha256` when the caller already knows it (the service hashes uploads); otherwise the file is
    hashed here when `options.hash_slide` is set.
    """
    t0 = time.perf_counter()
    folder = Path(job_dir)
    folder.mkdir(parents=True, exist_ok=True)
    local = Path(slide_path)
    hashing = slide_sha256 is None and options.hash_slide and local.is_file()
    # the file is hashed on a thread while tissue is detected (hashlib and the slide readers release the GIL)
    with ThreadPoolExecutor(1, thread_name_prefix="slide-sha256") if hashing else nullcontext() as pool:
        digest = pool.submit(file_sha256, local) if pool is not None else None
        with open_slide(slide_path, mpp_override=options.mpp_override) as slide:
            info = slide.info
            tissue = detect_tissue(slide)
            tiles = plan_tiles(
                info,
                tissue,
                input_mpp=model_meta.input_mpp,
                input_size=model_meta.input_size,
                min_tissue=options.min_tissue,
                overlap=options.overlap,
            )
        sha = digest.result() if digest is not None else slide_sha256
    if not cv2.imwrite(str(folder / TISSUE_FILE), tissue.mask.astype(np.uint8) * 255):
        raise PipelineError(f"cannot write the tissue mask into {folder}; check that it is writable")
    plan = JobPlan(
        slide_path=str(slide_path),
        slide_info=info.to_dict(),
        slide_sha256=sha,
        tiles=tiles,
        options=options,
        model=model_meta.to_dict(),
        fm_size=model_meta.fm_size,
        hm_downsample=float(options.hm_downsample or tiles.l0_tile_size / model_meta.fm_size),
        threshold=float(options.threshold if options.threshold is not None else model_meta.fg_threshold),
        l0_offset_xy=(int(info.bounds[0]), int(info.bounds[1])) if info.bounds else (0, 0),
        tissue_l0_per_px=float(tissue.l0_per_px),
        prepare_s=time.perf_counter() - t0,
    )
    plan.save(folder)
    logger.info(
        "planned %s: %d tiles, heatmap 1 cell = %.2f l0 px (%.2f s)",
        info.name,
        len(plan),
        plan.hm_downsample,
        plan.prepare_s,
    )
    return plan


def partial_heatmap(job_dir: str | os.PathLike[str]) -> tuple[np.ndarray, float] | None:
    """The heatmap (H, W) float32 from the chunk files present so far (NaN = not analysed yet), or None."""
    folder = Path(job_dir)
    if not (folder / PLAN_FILE).is_file():
        return None
    plan = JobPlan.load(folder)
    index = ChunkIndex(folder, len(plan), len(plan.model["classes"]))
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
