"""Planning a job: the analysis options, the saved plan of a job folder, and `prepare_job`, which makes it.

Planes: `l0_` level-0 slide pixels, `hm_` heatmap cells (`l0 = hm * hm_downsample`), `t_` tile indices into the
plan. A job folder holds `plan.json` (small values), `plan_tiles.npz` (per-tile arrays) and `tissue.png`; every
later step (`run_chunk`, `finalize_job`, the viewer's partial heatmap) starts from `JobPlan.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from model.runtime import ModelMetadata
from service.analysis.chunks import TISSUE_FILE, PipelineError, TissueGate
from service.outputs.stitching import HeatmapGrid
from service.slide.metadata import MPP_RANGE
from service.slide.tiling import RegionPlan, TilePlan, detect_tissue, plan_regions, plan_tiles
from service.slide.wsi import open_slide

__all__ = [
    "PLAN_FILE",
    "WORKER_OPTION_KEYS",
    "AnalysisOptions",
    "InvalidOptionsError",
    "JobPlan",
    "OptionSpec",
    "dense_layout",
    "file_sha256",
    "option_specs",
    "prepare_job",
]

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TILES_FILE = "plan_tiles.npz"
# the cost a job may ask for: 0.9 overlap is 100x the tiles of none; beyond it the cost explodes (0.999: 10^6 x)
MAX_OVERLAP = 0.9
PLAN_VERSION = 1


@dataclass(frozen=True)
class OptionSpec:
    """The type and range of one analysis option: the one definition that `AnalysisOptions` checks and the API's
    request schema (and so its OpenAPI document) is generated from."""

    kind: type  # bool, int, float or str
    description: str
    ge: float | None = None  # bounds, inclusive (ge, le) or exclusive (gt, lt)
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # None is a valid value (it means "derive it", see the description)
    worker: bool = False  # how fast a job runs, not what it finds: each worker sets it from its own settings

    def check(self, name: str, value: Any) -> None:
        """Raise ValueError saying what is wrong and what would work."""
        if value is None:
            if not self.nullable:
                raise ValueError(f"{name} must be given ({self.description}), got None")
            return
        ok_type = (isinstance(value, bool) if self.kind is bool
                   else isinstance(value, int) and not isinstance(value, bool) if self.kind is int
                   else isinstance(value, int | float) and not isinstance(value, bool) if self.kind is float
                   else isinstance(value, self.kind))
        if not ok_type:
            raise ValueError(f"{name} must be {_KIND_NAMES[self.kind]} ({self.description}), got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if self.kind in (int, float) and not (math.isfinite(value) and self._in_range(value)):
            raise ValueError(f"{name} must be in {self.range_text()} ({self.description}), got {value!r}")

    def _in_range(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def range_text(self) -> str:
        """The range as an interval, e.g. [0, 1) or (0, 4096]."""
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else "(-inf"
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option(default: Any, spec: OptionSpec) -> Any:
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True)
class AnalysisOptions:
    """Parameters of one analysis; every one is recorded in the result's provenance, and checked on creation
    against its `OptionSpec` (`option_specs()`), which the API's request schema is built from too."""

    mpp_override: float | None = _option(None, OptionSpec(
        float, "microns per level-0 pixel, when the slide's own value is missing or wrong",
        ge=MPP_RANGE[0], le=MPP_RANGE[1], nullable=True))
    min_tissue: float = _option(0.1, OptionSpec(float, "keep tiles with at least this tissue fraction", ge=0, le=1))
    overlap: float = _option(0.0, OptionSpec(
        float, "fraction of a tile shared with its neighbour (0.5 = half-tile steps; at most 0.9, 100 times the "
               "tiles of no overlap)", ge=0, le=MAX_OVERLAP))
    batch_size: int = _option(16, OptionSpec(int, "tiles per inference batch", ge=1, le=4096, worker=True))
    chunk_size: int = _option(256, OptionSpec(
        int, "tiles per chunk (queue message, progress step)", ge=1, le=1_000_000, worker=True))
    hm_downsample: float | None = _option(None, OptionSpec(
        float, "level-0 pixels per heatmap cell; null: one model output cell", ge=1, le=4096, nullable=True))
    threshold: float | None = _option(None, OptionSpec(
        float, "foreground probability threshold; null: the model's fg_threshold", gt=0, lt=1, nullable=True))
    blend: str = _option("mean", OptionSpec(str, "how overlapping tiles are averaged", choices=("mean", "cosine")))
    tissue_only: bool = _option(True, OptionSpec(
        bool, "foreground only on tissue: heatmap cells whose centre is off the tissue mask (glass, white "
              "background inside a kept tile) get probability 0"))
    write_detections: bool = _option(True, OptionSpec(
        bool, "QuPath tile objects with probabilities (measurement maps) in the GeoJSON"))
    simplify_hm: float = _option(0.5, OptionSpec(
        float, "polygon simplification tolerance in heatmap cells", ge=0, le=100))
    min_region_cells: int = _option(4, OptionSpec(
        int, "drop positive specks smaller than this many heatmap cells (GeoJSON only)", ge=0, le=1_000_000))
    reader_threads: int = _option(2, OptionSpec(int, "tile decoding threads", ge=1, le=256, worker=True))
    reader_processes: int = _option(0, OptionSpec(
        int, "> 0: decode TIFF tiles in this many processes (many cores + GPU; docs/analysis.md); 0: threads",
        ge=0, le=256, worker=True))
    geojson_gzip: bool = _option(False, OptionSpec(bool, "write result.geojson.gz", worker=True))
    hash_slide: bool = _option(True, OptionSpec(
        bool, "SHA-256 of the slide file in the provenance (reads the whole file once)"))
    inference: str = _option("auto", OptionSpec(
        str, "dense: the model runs on regions of tiles with a context halo and their cores are written edge "
             "to edge (no seams; needs a format_version 2 model and overlap 0); tiles: every tile on its own; "
             "auto: dense when the model and overlap allow it", choices=("auto", "dense", "tiles")))
    region_tiles: int = _option(8, OptionSpec(
        int, "dense inference: the most tiles along a region's side (regions are rectangles laid over the "
             "tissue, each run with its halo as one model input)", ge=1, le=16))
    halo_px: int = _option(96, OptionSpec(
        int, "dense inference: context margin around each region core, in model-input pixels (a multiple of "
             "the model's output stride); read, never written", ge=0, le=512))

    def __post_init__(self) -> None:
        """Refuse values that cannot work, saying what would."""
        for f in dataclasses.fields(self):
            f.metadata["spec"].check(f.name, getattr(self, f.name))

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


def option_specs() -> dict[str, tuple[Any, OptionSpec]]:
    """Every analysis option: name -> (default, spec), in declaration order."""
    return {f.name: (f.default, f.metadata["spec"]) for f in dataclasses.fields(AnalysisOptions)}


WORKER_OPTION_KEYS: Final = tuple(name for name, (_, spec) in option_specs().items() if spec.worker)


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
    # dense inference: {"tiles_per_side", "halo_in"}; the tiles are then in region-major order
    regions: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def region_plan(self) -> RegionPlan | None:
        """The regions the tiles are read and inferred in (dense inference), else None."""
        if self.regions is None:
            return None
        return plan_regions(self.tiles, int(self.regions["tiles_per_side"]), int(self.regions["halo_in"]))

    @property
    def l0_xy(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left corners of the planned tiles."""
        return self.tiles.l0_xy

    def tissue_gate(self, job_dir: str | os.PathLike[str]) -> TissueGate | None:
        """The gate that keeps the fg maps on tissue (`tissue_only`), from the job's tissue mask; None when off
        or when the mask is missing."""
        if not self.options.tissue_only:
            return None
        mask = cv2.imread(str(Path(job_dir) / TISSUE_FILE), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            return None
        w, h = self.slide_info["l0_size_wh"]
        return TissueGate(mask > 0, self.tissue_l0_per_px, self.l0_xy, float(self.tiles.l0_tile_size), (int(w), int(h)))

    def __len__(self) -> int:
        return len(self.tiles)

    def chunks(self, chunk_size: int | None = None) -> list[range]:
        """Tile index ranges of at most `chunk_size` tiles (default: the plan's), in plan order."""
        size = int(chunk_size or self.options.chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {size}")
        regions = self.region_plan
        if regions is None:
            return [range(i, min(i + size, len(self))) for i in range(0, len(self), size)]
        # dense: whole regions per chunk (a region's core is written by one chunk), about `size` tiles each
        out: list[range] = []
        start = 0
        for r in regions.tile_ranges():
            if r.stop - start >= size:
                out.append(range(start, r.stop))
                start = r.stop
        if start < len(self):
            out.append(range(start, len(self)))
        return out

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


class InvalidOptionsError(ValueError):
    """Options that are each valid but cannot work together, or not with this model (retrying cannot help)."""


def dense_layout(options: AnalysisOptions, model_meta: ModelMetadata) -> dict[str, int] | None:
    """The region layout of dense inference for these options and this model, or None for tile by tile.

    `auto` is dense when the model is (format_version 2) and tiles do not overlap; `dense` insists and says
    why it cannot be.
    """
    if options.inference == "tiles" or (options.inference == "auto" and
                                        (not model_meta.dense or options.overlap > 0)):
        return None
    if not model_meta.dense:
        raise InvalidOptionsError(f"inference 'dense' needs a format_version 2 model; this one is version "
                            f"{model_meta.format_version} (upgrade it: python -m model.export --upgrade IN OUT), "
                            "or use inference 'tiles'")
    if options.overlap > 0:
        raise InvalidOptionsError(f"inference 'dense' writes region cores edge to edge: it needs overlap 0, got "
                            f"{options.overlap}; drop overlap, or use inference 'tiles'")
    if options.halo_px % model_meta.output_stride:
        raise InvalidOptionsError(f"halo_px {options.halo_px} must be a multiple of the model's output stride "
                            f"{model_meta.output_stride}")
    return {"tiles_per_side": options.region_tiles, "halo_in": options.halo_px}


def prepare_job(
    slide_path: str | Path,
    model_meta: ModelMetadata,
    options: AnalysisOptions,
    job_dir: str | os.PathLike[str],
    *,
    slide_sha256: str | None = None,
    max_tiles: int | None = None,
) -> JobPlan:
    """Open the slide, detect tissue, plan tiles at the model's scale, and save the plan in `job_dir`.

    Pass `slide_sha256` when the caller already knows it (the service hashes uploads); otherwise the file is
    hashed here when `options.hash_slide` is set. With `max_tiles`, a plan of more tiles is refused
    (InvalidOptionsError) before anything is written for it but the tissue mask.
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
    if max_tiles is not None and len(tiles) > max_tiles:
        raise InvalidOptionsError(
            f"the job would analyse {len(tiles)} tiles, over this server's limit of {max_tiles} per job "
            f"(PIXELCAM_MAX_TILES_PER_JOB); lower `overlap` (now {options.overlap:g}) or raise `min_tissue` "
            f"(now {options.min_tissue:g})"
        )
    regions = dense_layout(options, model_meta)
    if regions is not None:  # tiles in region-major order: a chunk is then a run of whole regions
        tiles = tiles.take(plan_regions(tiles, regions["tiles_per_side"], regions["halo_in"]).t_order)
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
        regions=regions,
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
