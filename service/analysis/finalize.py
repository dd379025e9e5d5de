"""Finalizing a job: chunk files -> heatmap.tif, overlay.png, result.geojson and result.json, in one banded pass.

Planes: `hm_` heatmap cells (`l0 = hm * hm_downsample`), `l0_` level-0 slide pixels. The stitched bands flow
through the evidence counter and the region grouper into the TIFF writer, so the heatmap is never held whole;
the grouper keeps only the regions still open at the current band (finished ones as outlines), and the GeoJSON
is written a batch of features at a time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.runtime import ModelMetadata
from service.analysis.chunks import TISSUE_FILE, ChunkIndex, PipelineError
from service.analysis.plan import JobPlan
from service.outputs.deepzoom import colormap_lut
from service.outputs.geojson import (
    Region,
    RegionGrouper,
    collect_runs,
    iter_region_features,
    tile_features,
    write_geojson,
)
from service.outputs.report import (
    EvidenceCounter,
    region_summaries,
    slide_call,
    software_versions,
    write_result,
)
from service.outputs.stitching import (
    LEGEND_MIN_W,
    cosine_window,
    overlay_legend,
    read_heatmap_level,
    render_overlay,
    stitch_bands,
    with_legend,
    write_heatmap_tiff,
    write_overlay_png,
)
from service.slide.wsi import open_slide

__all__ = [
    "OUTPUT_FILES",
    "AnalysisResult",
    "HeatmapOutput",
    "build_result",
    "finalize_job",
    "heatmap_meta",
    "slide_classification",
    "write_heatmap",
    "write_overlay",
    "write_result_geojson",
]

logger = logging.getLogger(__name__)

OUTPUT_FILES = {
    "result": "result.json",
    "heatmap": "heatmap.tif",
    "overlay": "overlay.png",
    "geojson": "result.geojson",
}
THUMB_MAX = 1024
THUMB_MAX_UPSCALE = 1.25  # enlarge a pyramid level by up to this much rather than shrink a 4x larger one
HEATMAP_ENCODING = "uint8: 0 = not analysed; v in 1..255 = analysed, foreground probability (v - 1) / 254"
FRAME_NOTE = (
    "level-0 pixels, origin top-left, y down, minus l0_offset_xy (the slide's bounds origin, which QuPath crops "
    "to; (0, 0) when the slide has no bounds)"
)
AGGREGATION_NONE = "no tissue tile was found, so the slide has no class"


@dataclass(frozen=True)
class AnalysisResult:
    """Where the outputs were written, and result.json's content."""

    out_dir: Path
    result: dict[str, Any]

    @property
    def label(self) -> str | None:
        """The slide's class (None when no tissue was found)."""
        label = self.result["classification"]["label"]
        return None if label is None else str(label)

    def path(self, key: str) -> Path:
        """The path of one output: 'result', 'heatmap', 'overlay' or 'geojson'."""
        return self.out_dir / str(self.result["outputs"][key])


def _provenance(plan: JobPlan, model_meta: ModelMetadata, model_sha256: str) -> dict[str, Any]:
    """Model checksum and metadata, parameters, software versions and the slide's identity."""
    return {
        "model": {"sha256": model_sha256, "metadata": model_meta.to_dict()},
        "slide": {"name": Path(plan.slide_path).name, "sha256": plan.slide_sha256, **plan.slide_info},
        "parameters": {
            **plan.options.to_dict(),
            "threshold": plan.threshold,
            "hm_downsample": plan.hm_downsample,
            "l0_tile_size": plan.tiles.l0_tile_size,
            "l0_stride": plan.tiles.l0_stride,
            "level": plan.tiles.level,
            "lvl_tile_size": plan.tiles.lvl_tile_size,
            "input_size": plan.tiles.input_size,
            "input_mpp": plan.tiles.input_mpp,
            # dense inference: the regions the model ran on (tiles per side, halo in input px); absent: tiles
            **({"regions": dict(plan.regions)} if plan.regions else {}),
        },
        "software": software_versions(),
    }


def _frame(plan: JobPlan) -> dict[str, Any]:
    return {"units": "level-0 pixels", "l0_offset_xy": list(plan.l0_offset_xy), "note": FRAME_NOTE}


@dataclass(frozen=True)
class HeatmapOutput:
    """What the stitching pass found: the evidence counts and the positive regions (outlines in heatmap cells)."""

    meta: dict[str, Any]  # result.json's "heatmap" entry: frame, cell size, encoding
    evidence: dict[str, Any]
    regions: list[Region]


def heatmap_meta(plan: JobPlan, l0_mpp: float) -> dict[str, Any]:
    """How heatmap.tif relates to the slide: cell size, frame and pixel encoding."""
    return {
        "hm_downsample": plan.hm_downsample,
        "hm_mpp": plan.hm_downsample * l0_mpp,
        "l0_size_wh": list(plan.slide_info["l0_size_wh"]),
        "size_wh": list(plan.grid().hm_size_wh),
        "encoding": HEATMAP_ENCODING,
        "frame": "level-0 pixels / hm_downsample (the full level-0 frame, no bounds offset)",
    }


def write_heatmap(
    plan: JobPlan, index: ChunkIndex, job_dir: Path, out: Path, model_sha256: str
) -> HeatmapOutput:
    """Step 1. One pass: stitch bands, count evidence, group positive runs into regions, write heatmap.tif.

    The heatmap is never held whole; the tissue mask goes with the evidence counter. With `tissue_only` the index
    already hands out fg maps that are 0 off the tissue (`JobPlan.tissue_gate`).
    """
    l0_mpp = plan_l0_mpp(plan)
    meta = heatmap_meta(plan, l0_mpp)
    description = json.dumps(
        {"pixelcam_heatmap": meta, "model_sha256": model_sha256, "slide_sha256": plan.slide_sha256}
    )
    grid = plan.grid()
    tissue = cv2.imread(str(job_dir / TISSUE_FILE), cv2.IMREAD_GRAYSCALE)
    counter = EvidenceCounter(
        grid, plan.threshold, None if tissue is None else tissue > 0, plan.tissue_l0_per_px
    )
    del tissue  # the counter keeps the boolean mask only
    window = cosine_window((plan.fm_size, plan.fm_size)) if plan.options.blend == "cosine" else None
    bands = stitch_bands(grid, plan.l0_xy, plan.tiles.l0_tile_size, index.load_fg, window=window)
    grouper = RegionGrouper(min_cells=plan.options.min_region_cells)
    counted = (counter.add(band) for band in bands)
    write_heatmap_tiff(
        out / OUTPUT_FILES["heatmap"],
        collect_runs(counted, plan.threshold, grouper),
        grid,
        l0_mpp=l0_mpp,
        description=description,
    )
    return HeatmapOutput(meta, counter.to_dict(l0_mpp), grouper.regions())


def write_overlay(plan: JobPlan, out: Path, result: dict[str, Any] | None = None) -> Path:
    """Step 2. The slide thumbnail with heatmap.tif (already in `out`) blended in, as overlay.png; with the result,
    a legend strip under it: the colour bar with the threshold, a scale bar (the job's µm/px) and the call."""
    with open_slide(plan.slide_path, mpp_override=plan.options.mpp_override) as slide:
        thumb = slide.thumbnail((THUMB_MAX, THUMB_MAX), max_upscale=THUMB_MAX_UPSCALE)
    hm = read_heatmap_level(out / OUTPUT_FILES["heatmap"], (thumb.shape[1], thumb.shape[0]))
    path = out / OUTPUT_FILES["overlay"]
    image = render_overlay(thumb, hm, plan.grid())
    if result is not None:
        image = with_legend(image, _legend(plan, result, thumb.shape[1]))
    write_overlay_png(path, image)
    return path


def _legend(plan: JobPlan, result: dict[str, Any], thumb_w: int) -> np.ndarray:
    """The overlay's legend strip for this job."""
    l0_w = float(plan.slide_info["l0_size_wh"][0])
    mpp = float(plan.slide_info.get("mpp_x") or 0.0)
    call = result.get("classification") or {}
    model = result.get("provenance", {}).get("model", {})
    meta = model.get("metadata", {})
    text = f"{call['label']}  p={call['probability']:.3f}" if call.get("label") else "no call"
    detail = f"model {meta.get('encoder', '?')} {str(model.get('sha256', ''))[:8]}\nresearch use only, not diagnosis"
    strip, _ = overlay_legend(max(thumb_w, LEGEND_MIN_W), um_per_px=mpp * l0_w / thumb_w if mpp else None,
                              threshold=plan.threshold, call=text, detail=detail, cmap_lut=colormap_lut("turbo"),
                              label=f"{meta.get('foreground', {}).get('name', 'foreground')} probability")
    return strip


def _features(
    plan: JobPlan, regions: list[Region], index: ChunkIndex, meta: ModelMetadata, seed: str, l0_mpp: float
) -> Iterator[dict[str, Any]]:
    """Annotations for the positive regions, then (optionally) one tile object per analysed tile."""
    yield from iter_region_features(
        regions,
        hm_downsample=plan.hm_downsample,
        l0_size_wh=tuple(plan.slide_info["l0_size_wh"]),
        l0_mpp=l0_mpp,
        name=meta.foreground_name,
        color=meta.foreground_color,
        l0_offset_xy=plan.l0_offset_xy,
        simplify_hm=plan.options.simplify_hm,
        seed=seed,
    )
    if plan.options.write_detections and len(plan):
        yield from tile_features(
            plan.l0_xy,
            plan.tiles.l0_tile_size,
            index.class_probs,
            index.fg_mean,
            class_names=meta.class_names,
            class_colors=meta.class_colors,
            positive_index=meta.positive_index,
            l0_offset_xy=plan.l0_offset_xy,
            seed=seed,
            l0_size_wh=tuple(plan.slide_info["l0_size_wh"]),
        )


def write_result_geojson(
    plan: JobPlan, regions: list[Region], index: ChunkIndex, model_meta: ModelMetadata, provenance: dict[str, Any],
    out: Path,
) -> Path:
    """Step 3. The QuPath FeatureCollection (regions, then tile objects), written a batch of features at a time.

    Feature ids are UUIDs seeded by the model, the slide and the parameters, so a rerun writes the same ids.
    """
    seed = f"{provenance['model']['sha256']}/{plan.slide_sha256 or plan.slide_path}/" \
           f"{json.dumps(provenance['parameters'])}"
    name = OUTPUT_FILES["geojson"] + (".gz" if plan.options.geojson_gzip else "")
    path = out / name
    write_geojson(path, _features(plan, regions, index, model_meta, seed, plan_l0_mpp(plan)),
                  {"frame": _frame(plan), **provenance})
    return path


def slide_classification(plan: JobPlan, index: ChunkIndex, model_meta: ModelMetadata) -> dict[str, Any]:
    """The slide's class from its tile outputs (the report's aggregation), or a null call without tissue."""
    if len(plan):
        return slide_call(
            index.class_probs, model_meta.class_names, model_meta.positive_index, plan.tiles.tissue_fraction
        ).to_dict()
    return {
        "label": None,
        "probability": None,
        "positive_class": model_meta.positive_class,
        "positive_probability": None,
        "aggregation": {"method": None, "why": AGGREGATION_NONE},
    }


def build_result(
    plan: JobPlan, index: ChunkIndex, model_meta: ModelMetadata, heatmap: HeatmapOutput,
    provenance: dict[str, Any], geojson_name: str, timings_s: dict[str, float],
) -> dict[str, Any]:
    """Step 4. result.json's document: status, the call, the evidence, the frame, outputs, provenance, timings."""
    call = slide_classification(plan, index, model_meta)
    if len(plan):
        status, message = "ok", f"{len(plan)} tissue tiles analysed"
    else:
        status, message = "no_tissue", "no tissue was found on this slide; nothing was analysed"
    read_s, infer_s, chunk_wall_s = (float(v) for v in index.timings)
    top_regions = region_summaries(
        heatmap.regions, hm_downsample=plan.hm_downsample, l0_mpp=plan_l0_mpp(plan), l0_offset_xy=plan.l0_offset_xy
    )
    return {
        "schema": "pixelcam-result",
        "schema_version": 1,
        "status": status,
        "message": message,
        "classification": call,
        "evidence": {
            **heatmap.evidence,
            "tiles_analysed": len(plan),
            "regions": len(heatmap.regions),
            "top_regions": top_regions,
        },
        "frame": _frame(plan),
        "heatmap": heatmap.meta,
        "outputs": {**OUTPUT_FILES, "geojson": geojson_name},
        "provenance": provenance,
        "timings_s": {
            "prepare": round(plan.prepare_s, 3),
            "chunks_read": round(read_s, 3),
            "chunks_infer": round(infer_s, 3),
            "chunks_wall": round(chunk_wall_s, 3),
            **{k: round(v, 3) for k, v in timings_s.items()},
        },
    }


def plan_l0_mpp(plan: JobPlan) -> float:
    """Mean microns per level-0 pixel of the planned slide."""
    return float(plan.slide_info["mpp_x"] + plan.slide_info["mpp_y"]) / 2


def finalize_job(
    job_dir: str | os.PathLike[str],
    plan: JobPlan,
    model_meta: ModelMetadata,
    model_sha256: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> AnalysisResult:
    """Stitch every chunk in bounded memory and write heatmap.tif, overlay.png, result.json, result.geojson."""
    t0 = time.perf_counter()
    folder = Path(job_dir)
    out = Path(out_dir) if out_dir is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    index = ChunkIndex(folder, len(plan), model_meta.num_classes, gate=plan.tissue_gate(folder))
    missing = int((~index.present).sum())
    if missing:
        raise PipelineError(
            f"{missing} of {len(plan)} tiles have no chunk output in the job's folder (their chunks did not run, or "
            "the storage lost their files); run those chunks, or resubmit the job"
        )
    provenance = _provenance(plan, model_meta, model_sha256)
    heatmap = write_heatmap(plan, index, folder, out, model_sha256)
    t_stitch = time.perf_counter()
    geojson = write_result_geojson(plan, heatmap.regions, index, model_meta, provenance, out)
    t_geojson = time.perf_counter()
    result = build_result(plan, index, model_meta, heatmap, provenance, geojson.name, {})
    del heatmap  # the outlines are summarised: the overlay must not find them still held
    write_overlay(plan, out, result)
    t_overlay = time.perf_counter()
    result["timings_s"].update(stitch=round(t_stitch - t0, 3), geojson=round(t_geojson - t_stitch, 3),
                               overlay=round(t_overlay - t_geojson, 3))
    write_result(out / OUTPUT_FILES["result"], result)
    logger.info(
        "finalized %s: %s (%s), %d regions, %.2f s",
        Path(plan.slide_path).name,
        result["status"],
        result["classification"]["label"],
        result["evidence"]["regions"],
        time.perf_counter() - t0,
    )
    return AnalysisResult(out_dir=out, result=result)
