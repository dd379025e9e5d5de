"""End to end on the real CMU slide with a random model: one-process analysis and the chunked queue path."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import shape

from service.analysis.chunks import ChunkIndex, ChunkOutput, PipelineError, load_chunk, save_chunk
from service.analysis.finalize import (
    OUTPUT_FILES,
    AnalysisResult,
    build_result,
    finalize_job,
    write_heatmap,
    write_overlay,
    write_result_geojson,
)
from service.analysis.inference import run_chunk
from service.analysis.pipeline import Progress, analyze_slide, partial_heatmap
from service.analysis.plan import AnalysisOptions, JobPlan, prepare_job
from service.outputs.stitching import LEGEND_H, LEGEND_MIN_W, decode_heatmap, tile_footprints
from service.slide.wsi import open_slide

OUTPUTS = {"result.json", "heatmap.tif", "overlay.png", "result.geojson"}


@pytest.fixture(scope="module")
def cmu_run(cmu_small_path: Path, random_predictor, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cmu")
    seen: list[Progress] = []
    result = analyze_slide(cmu_small_path, random_predictor, out, AnalysisOptions(), progress=seen.append)
    return result, seen


def test_analysis_writes_the_four_outputs_and_nothing_else(cmu_run: tuple[AnalysisResult, list]) -> None:
    result, _ = cmu_run
    assert {p.name for p in result.out_dir.iterdir()} == OUTPUTS
    doc = json.loads(result.path("result").read_text())
    assert doc == result.result
    assert doc["status"] == "ok"
    assert doc["classification"]["label"] in ("benign", "malignant")
    assert 0.5 <= doc["classification"]["probability"] <= 1.0
    assert doc["classification"]["aggregation"]["method"] == "top_k_mean"
    evidence = doc["evidence"]
    assert evidence["tiles_analysed"] > 0
    assert 0 < evidence["tissue_area_mm2"] < 2220 * 2967 * 0.499**2 / 1e6
    assert 0 <= evidence["positive_area_mm2"] <= evidence["analysed_area_mm2"]
    assert 0 <= evidence["positive_fraction_of_tissue"] <= 1
    prov = doc["provenance"]
    assert len(prov["model"]["sha256"]) == 64 and len(prov["slide"]["sha256"]) == 64
    assert prov["slide"]["mpp_source"] == "openslide.mpp-x"
    assert {"python", "numpy", "onnxruntime", "tiffslide"} <= set(prov["software"])
    assert set(doc["timings_s"]) >= {"prepare", "chunks_infer", "stitch", "geojson", "overlay"}


def test_progress_counts_every_tile_once(cmu_run: tuple[AnalysisResult, list]) -> None:
    result, seen = cmu_run
    total = result.result["evidence"]["tiles_analysed"]
    assert seen[0].done == 0 and seen[-1].done == total
    assert all(p.total == total for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].tiles_per_s > 0 and seen[-1].eta_s == 0


def test_heatmap_tiff_has_the_declared_frame_and_scale(cmu_run: tuple[AnalysisResult, list]) -> None:
    result, _ = cmu_run
    meta = result.result["heatmap"]
    # one heatmap cell = one model output cell: 224 px x 1.0 um / 28 cells = 8 um
    assert meta["hm_mpp"] == pytest.approx(8.0, rel=0.01)  # the plan may snap the tile by a pixel
    assert meta["size_wh"] == [
        int(np.ceil(2220 / meta["hm_downsample"])),
        int(np.ceil(2967 / meta["hm_downsample"])),
    ]
    with tifffile.TiffFile(result.path("heatmap")) as tif:
        page = tif.pages[0]
        values = page.asarray()
        assert (page.imagewidth, page.imagelength) == tuple(meta["size_wh"])
        x_res = page.tags["XResolution"].value
        assert 1e4 * x_res[1] / x_res[0] == pytest.approx(meta["hm_mpp"], rel=1e-4)  # um per cell
        assert json.loads(page.description)["pixelcam_heatmap"]["hm_downsample"] == meta["hm_downsample"]
    prob, covered = decode_heatmap(values)
    cell_mm2 = (meta["hm_mpp"] / 1000) ** 2
    assert covered.sum() * cell_mm2 == pytest.approx(result.result["evidence"]["analysed_area_mm2"], abs=1e-3)


def _check_qupath_feature(feature: dict) -> None:
    """QuPath's GeoJSON reader rules (FIELD.md 4.1) for one feature."""
    assert set(feature) == {"type", "id", "geometry", "properties"} and feature["type"] == "Feature"
    assert str(uuid.UUID(feature["id"])) == feature["id"]
    assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    props = feature["properties"]
    assert props["objectType"] in ("annotation", "detection", "tile")
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    measurements = props["measurements"]
    assert isinstance(measurements, dict) and measurements
    assert all(isinstance(k, str) and math.isfinite(v) for k, v in measurements.items())
    for x, y in shapely.get_coordinates(shape(feature["geometry"])).tolist():
        assert round(x, 2) == x and round(y, 2) == y


def test_geojson_is_a_qupath_feature_collection(cmu_run: tuple[AnalysisResult, list]) -> None:
    result, _ = cmu_run
    doc = json.loads(result.path("geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in doc["features"]]
    assert kinds.count("tile") == result.result["evidence"]["tiles_analysed"]
    assert kinds.count("annotation") >= 1
    assert doc["metadata"]["frame"]["l0_offset_xy"] == [0, 0]
    assert doc["metadata"]["model"]["sha256"] == result.result["provenance"]["model"]["sha256"]
    assert len({f["id"] for f in doc["features"]}) == len(doc["features"])
    side = result.result["provenance"]["parameters"]["l0_tile_size"]
    for feature in doc["features"]:
        _check_qupath_feature(feature)
        geom = shape(feature["geometry"])
        assert geom.is_valid and not geom.is_empty
        x0, y0, x1, y1 = geom.bounds
        assert min(x0, y0) >= 0
        assert x1 <= 2220 and y1 <= 2967  # annotations and tile objects alike are clipped to the slide
        if feature["properties"]["objectType"] == "tile":  # full size unless cut at the right or bottom edge
            assert x1 - x0 == pytest.approx(side, abs=0.01) or x1 == 2220
            assert y1 - y0 == pytest.approx(side, abs=0.01) or y1 == 2967


@pytest.mark.parametrize("mode", [
    {"inference": "tiles", "chunk_size": 7},
    {"inference": "dense", "region_tiles": 2, "chunk_size": 4},  # 9 regions of 2 x 2 tiles on CMU
])
def test_chunks_in_any_order_and_redone_give_the_same_result(
    cmu_small_path: Path, random_predictor, tmp_path: Path, mode: dict
) -> None:
    job = tmp_path / "job"
    options = AnalysisOptions(**mode)
    reference = analyze_slide(cmu_small_path, random_predictor, tmp_path / "reference", options)
    plan = prepare_job(cmu_small_path, random_predictor.metadata, options, job)
    loaded = JobPlan.load(job)
    np.testing.assert_array_equal(loaded.l0_xy, plan.l0_xy)
    assert loaded.hm_downsample == plan.hm_downsample and loaded.options == plan.options
    assert loaded.regions == plan.regions and (plan.regions is None) == (mode["inference"] == "tiles")
    chunks = plan.chunks()
    assert len(chunks) >= 3 and [t for r in chunks for t in r] == list(range(len(plan)))
    if plan.region_plan is not None:  # a chunk is a run of whole regions: no region is split
        regions = plan.region_plan.t_region
        assert all(regions[c.start] != regions[c.start - 1] for c in chunks[1:])
        with open_slide(cmu_small_path) as slide, pytest.raises(PipelineError, match="whole regions"):
            run_chunk(slide, loaded, range(chunks[0].start, chunks[0].stop - 1), random_predictor)
    assert partial_heatmap(job) is None
    with open_slide(cmu_small_path) as slide:
        outs = {
            c: run_chunk(slide, loaded, chunks[c], random_predictor) for c in reversed(range(len(chunks)))
        }
    save_chunk(job, 1, outs[1])
    probs, hm_downsample = partial_heatmap(job)
    assert hm_downsample == plan.hm_downsample
    assert np.isfinite(probs).any() and np.isnan(probs).any()
    with pytest.raises(PipelineError, match="run those chunks, or resubmit the job"):
        finalize_job(job, loaded, random_predictor.metadata, random_predictor.sha256)
    for c, out in outs.items():
        save_chunk(job, c, out)
    save_chunk(job, 0, outs[0])  # a redelivered chunk rewrites the same file
    back = load_chunk(job / "chunks" / "chunk-000000.npz")
    np.testing.assert_array_equal(back.tile_indices, list(chunks[0]))
    result = finalize_job(job, loaded, random_predictor.metadata, random_predictor.sha256)
    with tifffile.TiffFile(result.path("heatmap")) as a, tifffile.TiffFile(reference.path("heatmap")) as b:
        mine, theirs = a.pages[0].asarray(), b.pages[0].asarray()
    np.testing.assert_array_equal(mine == 0, theirs == 0)
    assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1  # batch composition differs by ~1e-6
    assert result.label == reference.label


def test_batches_are_full_except_the_last(cmu_small_path: Path, random_predictor, tmp_path: Path) -> None:
    options = AnalysisOptions(batch_size=6, inference="tiles")
    plan = prepare_job(cmu_small_path, random_predictor.metadata, options, tmp_path)
    sizes: list[int] = []

    class Recording:
        metadata = random_predictor.metadata

        def predict(self, tiles: np.ndarray):
            sizes.append(tiles.shape[0])
            return random_predictor.predict(tiles)

    with open_slide(cmu_small_path) as slide:
        out = run_chunk(slide, plan, range(len(plan)), Recording())
    assert isinstance(out, ChunkOutput) and len(out) == len(plan)
    assert sum(sizes) == len(plan) and all(s == 6 for s in sizes[:-1]) and 1 <= sizes[-1] <= 6
    assert out.fg_prob.shape[1:] == (28, 28)
    np.testing.assert_allclose(out.class_probs.sum(axis=1), 1.0, atol=1e-5)
    with open_slide(cmu_small_path) as slide:
        assert len(run_chunk(slide, plan, [], random_predictor)) == 0
    with open_slide(cmu_small_path) as slide, pytest.raises(PipelineError, match="outside the plan"):
        run_chunk(slide, plan, [len(plan)], random_predictor)


def test_a_slide_without_tissue_gives_a_valid_empty_result(
    slides_dir: Path, random_predictor, tmp_path: Path
) -> None:
    result = analyze_slide(slides_dir / "small_16x16.svs", random_predictor, tmp_path, AnalysisOptions())
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS
    assert result.result["status"] == "no_tissue" and result.label is None
    assert "no tissue" in result.result["message"]
    assert result.result["evidence"]["tiles_analysed"] == 0
    assert json.loads(result.path("geojson").read_text())["features"] == []


def test_options_are_checked_and_round_trip() -> None:
    options = AnalysisOptions(mpp_override=0.25, overlap=0.5, blend="cosine")
    assert AnalysisOptions.from_dict(options.to_dict()) == options
    with pytest.raises(ValueError, match="overlap"):
        AnalysisOptions(overlap=1.0)
    with pytest.raises(ValueError, match="mpp_override"):
        AnalysisOptions(mpp_override=500.0)
    with pytest.raises(ValueError, match=r"mpp_override must be in \[0.05, 100\]"):
        AnalysisOptions(mpp_override=0.03)  # the slide layer's MPP_RANGE, not a second lower bound
    for bad in ({"hm_downsample": float("inf")}, {"simplify_hm": float("nan")}, {"min_region_cells": "abc"},
                {"write_detections": 1}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AnalysisOptions(**bad)
    with pytest.raises(ValueError, match="unknown analysis options"):
        AnalysisOptions.from_dict({"tile_size": 3})
    with pytest.raises(PipelineError, match="prepare_job"):
        JobPlan.load(Path("/nonexistent-job-folder"))


def test_one_process_batches_stay_full_across_chunk_edges(
    cmu_small_path: Path, random_predictor, tmp_path: Path
) -> None:
    sizes: list[int] = []

    class Recording:
        metadata = random_predictor.metadata
        sha256 = random_predictor.sha256

        def predict(self, tiles: np.ndarray):
            sizes.append(tiles.shape[0])
            return random_predictor.predict(tiles)

    options = AnalysisOptions(chunk_size=7, batch_size=5, write_detections=False, inference="tiles")
    result = analyze_slide(cmu_small_path, Recording(), tmp_path / "run", options)
    total = result.result["evidence"]["tiles_analysed"]
    assert total > 7 and sum(sizes) == total
    assert all(s == 5 for s in sizes[:-1])  # batches run across the 7-tile chunks
    reference = analyze_slide(cmu_small_path, random_predictor, tmp_path / "reference",
                              AnalysisOptions(inference="tiles"))
    with tifffile.TiffFile(result.path("heatmap")) as a, tifffile.TiffFile(reference.path("heatmap")) as b:
        mine, theirs = a.pages[0].asarray(), b.pages[0].asarray()
    np.testing.assert_array_equal(mine == 0, theirs == 0)
    assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1
    assert result.result["classification"]["label"] == reference.label


def test_overlapping_tiles_cover_exactly_their_footprints(
    cmu_small_path: Path, random_predictor, tmp_path: Path
) -> None:
    options = AnalysisOptions(overlap=0.5, min_tissue=0.5, blend="cosine", write_detections=False)
    known_sha = "ab" * 32
    plan = prepare_job(cmu_small_path, random_predictor.metadata, options, tmp_path, slide_sha256=known_sha)
    assert plan.slide_sha256 == known_sha  # given by the caller: the slide is not hashed again
    assert plan.tiles.l0_stride == pytest.approx(plan.tiles.l0_tile_size / 2)
    with open_slide(cmu_small_path) as slide:
        save_chunk(tmp_path, 0, run_chunk(slide, plan, range(len(plan)), random_predictor))
    result = finalize_job(tmp_path, plan, random_predictor.metadata, random_predictor.sha256)
    assert result.result["provenance"]["slide"]["sha256"] == known_sha
    with tifffile.TiffFile(result.path("heatmap")) as tif:
        values = tif.pages[0].asarray()
    expected = np.zeros(values.shape, bool)
    for x0, y0, x1, y1 in tile_footprints(plan.grid(), plan.l0_xy, plan.tiles.l0_tile_size):
        expected[max(y0, 0) : y1, max(x0, 0) : x1] = True
    np.testing.assert_array_equal(values != 0, expected)


def test_finalize_steps_run_one_by_one_give_what_finalize_job_gives(
    cmu_small_path: Path, random_predictor, tmp_path: Path, cmu_run: tuple[AnalysisResult, list]
) -> None:
    job = tmp_path / "job"
    plan = prepare_job(cmu_small_path, random_predictor.metadata, AnalysisOptions(), job)
    with open_slide(cmu_small_path) as slide:
        for c, tiles in enumerate(plan.chunks()):
            save_chunk(job, c, run_chunk(slide, plan, tiles, random_predictor))
    index = ChunkIndex(job, len(plan), random_predictor.metadata.num_classes, gate=plan.tissue_gate(job))
    out = tmp_path / "out"
    out.mkdir()
    heatmap = write_heatmap(plan, index, job, out, random_predictor.sha256)
    reference, _ = cmu_run
    ref = reference.result
    assert heatmap.evidence["positive_area_mm2"] == pytest.approx(ref["evidence"]["positive_area_mm2"], abs=1e-3)
    assert len(heatmap.regions) == ref["evidence"]["regions"] and heatmap.meta == ref["heatmap"]
    provenance = {"model": {"sha256": random_predictor.sha256}, "parameters": {"p": 1}}
    geojson = write_result_geojson(plan, heatmap.regions, index, random_predictor.metadata, provenance, out)
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == len(json.loads(reference.path("geojson").read_text())["features"])
    doc = build_result(plan, index, random_predictor.metadata, heatmap, provenance, geojson.name, {"stitch": 1.0})
    assert doc["classification"]["label"] == ref["classification"]["label"]
    assert doc["evidence"]["tiles_analysed"] == len(plan) and doc["timings_s"]["stitch"] == 1.0
    overlay = write_overlay(plan, out)
    assert overlay.name == OUTPUT_FILES["overlay"] and overlay.stat().st_size > 0
    bare = cv2.imread(str(overlay))
    with_call = cv2.imread(str(write_overlay(plan, out, doc)))  # what finalize_job writes: a legend under it
    assert with_call.shape[0] == bare.shape[0] + LEGEND_H and with_call.shape[1] == max(bare.shape[1], LEGEND_MIN_W)
