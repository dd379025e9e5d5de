"""The benchmark slide generator writes slides that both readers open, with the MPP, vendor and tissue asked for;
bench_analyze runs end to end on a tiny one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import openslide
import pytest
import tiffslide

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_make_slide() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_slide", REPO_ROOT / "bench" / "make_slide.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_slide"] = module
    spec.loader.exec_module(module)
    return module


make_slide = _load_make_slide()


def _write(tmp_path: Path, data_dir: Path, fmt: str, size: int, fraction: float, mpp: float) -> Path:
    spec = make_slide.SlideSpec(
        l0_size_wh=(size, size - 512),
        tissue_fraction=fraction,
        mpp=mpp,
        tile=256,
        quality=80,
        fmt=fmt,
        seed=3,
    )
    return make_slide.write_slide(tmp_path / f"synthetic.{fmt}", spec, data_dir=data_dir, max_cells=6)


def _atlas_rng() -> np.random.Generator:
    return np.random.default_rng([3, 0])  # the generator's own atlas seed for seed 3


def _saturated_share(rgb: np.ndarray) -> float:
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    return float((cv2.medianBlur(sat, 7) > 15).mean())


def test_svs_opens_in_openslide_and_tiffslide_as_aperio(tmp_path: Path, data_dir: Path) -> None:
    path = _write(tmp_path, data_dir, "svs", 4096, 0.3, 0.25)
    osl, tsl = openslide.OpenSlide(str(path)), tiffslide.TiffSlide(path)
    try:
        assert osl.properties["openslide.vendor"] == "aperio"
        assert tsl.properties["tiffslide.vendor"] == "aperio"
        assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(tsl.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert osl.properties["openslide.objective-power"] == "40"
        assert osl.level_dimensions == ((4096, 3584), (1024, 896))
        assert tsl.level_dimensions == osl.level_dimensions
        assert "thumbnail" in osl.associated_images
        overview = np.asarray(osl.read_region((0, 0), 1, osl.level_dimensions[1]).convert("RGB"))
        assert _saturated_share(overview) == pytest.approx(0.3, abs=0.05)
        # Same pixels through both readers, and the colours that were rendered (up to JPEG loss): a YCbCr/RGB
        # mix-up in the tiles would be off by tens of levels.
        spec = make_slide.SlideSpec((4096, 3584), 0.3, 0.25, 256, 80, "svs", 3)
        renderer = make_slide.SlideRenderer(spec, make_slide.build_atlas(data_dir, 0.25, 6, _atlas_rng()))
        sat = cv2.cvtColor(overview, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
        lvl_y, lvl_x = np.unravel_index(np.argmax(cv2.blur(sat, (64, 64))), sat.shape)
        in_tissue = (int(lvl_x) * 4 - 128, int(lvl_y) * 4 - 128)
        for l0_xy in ((0, 0), in_tissue, (3840, 3328)):
            a = np.asarray(osl.read_region(l0_xy, 0, (256, 256)).convert("RGB"))
            b = np.asarray(tsl.read_region(l0_xy, 0, (256, 256)))[..., :3]
            np.testing.assert_array_equal(a, b)
            rendered = renderer.render(1, l0_xy, (256, 256)).astype(np.float32)
            assert np.abs(a.astype(np.float32) - rendered).mean(axis=(0, 1)).max() < 4.0
        tissue = np.asarray(osl.read_region(in_tissue, 0, (256, 256)).convert("RGB"))
        assert _saturated_share(tissue) > 0.9
    finally:
        osl.close()
        tsl.close()


def test_generic_tiff_has_resolution_mpp_and_a_pyramid_in_both_readers(
    tmp_path: Path, data_dir: Path
) -> None:
    path = _write(tmp_path, data_dir, "tiff", 2560, 0.5, 0.5)
    osl, tsl = openslide.OpenSlide(str(path)), tiffslide.TiffSlide(path)
    try:
        assert osl.properties["openslide.vendor"] == "generic-tiff"
        assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(tsl.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert osl.level_dimensions == ((2560, 2048), (1280, 1024))
        assert tsl.level_dimensions == osl.level_dimensions
        level1 = np.asarray(osl.read_region((0, 0), 1, (1280, 1024)).convert("RGB"))
        assert _saturated_share(level1) == pytest.approx(0.5, abs=0.06)
        # The background is white-ish with light noise, the tissue is stained (H&E is pink/purple).
        sat = cv2.cvtColor(level1, cv2.COLOR_RGB2HSV)[..., 1]
        background, tissue = level1[sat < 10], level1[sat > 60]
        assert background.mean() > 225 and 0.5 < background.std() < 6
        assert tissue[:, 1].mean() < tissue[:, 0].mean() - 20
    finally:
        osl.close()
        tsl.close()


def test_refuses_impossible_parameters(tmp_path: Path, data_dir: Path) -> None:
    spec = make_slide.SlideSpec((4096, 4096), 0.0, 0.5, 256, 80, "svs", 0)
    with pytest.raises(make_slide.SlideGenerationError, match="--tissue-fraction"):
        make_slide.write_slide(tmp_path / "x.svs", spec, data_dir=data_dir)


def test_bench_analyze_runs_on_a_tiny_slide(tmp_path: Path, data_dir: Path) -> None:
    """The benchmark end to end (torch backend on the CPU, no RSS children): every ratio comes out, positive."""
    env = dict(os.environ, PIXELCAM_DATA_DIR=str(data_dir), PIXELCAM_BENCH_DATA=str(tmp_path / "data"),
               PIXELCAM_BENCH_OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    out = tmp_path / "result.json"
    args = ["--random-model", "--width", "2048", "--height", "2048", "--backend", "torch", "--device", "cpu",
            "--threads", "1", "--naive-tiles", "2", "--model-tiles", "8", "--repeats", "1", "--skip-rss",
            "--batch-size", "4", "--json", str(out)]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_analyze.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["backend"]["backend"] == "torch" and res["backend"]["device"] == "cpu"
    assert res["slides"]["small"]["tissue_tiles"] > 0 and res["slides"]["large"] is None
    for key in ("pipeline_efficiency", "tile_phase_efficiency", "reading_ratio", "naive_ratio"):
        assert res["ratios"][key] > 0, key
    assert isinstance(res["analysis"]["runs"][0]["regions"], int)
    assert res["model"]["parity_torch_vs_onnx"]["fg_prob"] < 1e-3  # the torch weights are the ONNX's
    assert "pipeline efficiency" in done.stdout


def test_bench_models_measures_every_model_in_each_round(tmp_path: Path, data_dir: Path) -> None:
    model = REPO_ROOT / "model" / "weights" / "pixelcam-glas-lite0-s5.onnx"
    if not model.is_file():
        pytest.skip("the default model is not in this checkout")
    env = dict(os.environ, PIXELCAM_DATA_DIR=str(data_dir))
    args = [str(model), "--threads", "1", "--rounds", "2", "--batch", "4", "--region", "256"]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_models.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])["results"][model.name]
    assert all(len(v) == 2 and min(v) > 0 for v in res.values()), res


def test_bench_extract_reads_every_slide_in_flat_memory(tmp_path: Path, data_dir: Path) -> None:
    env = dict(os.environ, PIXELCAM_DATA_DIR=str(data_dir), PIXELCAM_BENCH_DATA=str(tmp_path))
    args = ["--width", "3072", "--height", "2048", "--counts", "1,3"]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_extract.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    one, three = report["runs"]
    assert one["slides"] == 1 and three["slides"] == 3 and one["tiles"] > 0
    assert three["tiles"] == 3 * one["tiles"] and min(one["tiles_per_s"], three["tiles_per_s"]) > 0
    assert report["rss_ratio_most_vs_fewest_slides"] < 1.3  # one batch in memory, whatever the slide count
