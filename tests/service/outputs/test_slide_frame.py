"""The heatmap in the slide's level-0 frame: OpenSlide and tiffslide see the slide's geometry, values match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from service.analysis.pipeline import analyze_slide
from service.outputs.deepzoom import colormap_lut
from service.outputs.slide_frame import SlideFrameError, default_downsample, write_slide_frame_heatmap
from service.outputs.stitching import NODATA


@pytest.fixture(scope="module")
def cmu_job(tmp_path_factory: pytest.TempPathFactory, cmu_small_path: Path, random_predictor: Any) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cmu")
    result = analyze_slide(cmu_small_path, random_predictor, out)
    return out, result.result


def _write(job: tuple[Path, dict], name: str, **kw: Any) -> tuple[Path, dict]:
    out, doc = job
    hm = doc["heatmap"]
    info = write_slide_frame_heatmap(out / "heatmap.tif", out / name, l0_size_wh=tuple(hm["l0_size_wh"]),
                                     hm_downsample=hm["hm_downsample"], l0_mpp=doc["provenance"]["slide"]["mpp_x"],
                                     **kw)
    return out / name, info


def test_at_downsample_1_both_readers_see_the_slide_dimensions(cmu_job: tuple[Path, dict], cmu_small_path: Path
                                                               ) -> None:
    path, info = _write(cmu_job, "l0.tif", colormap="likelihood", downsample=1)
    with openslide.OpenSlide(str(cmu_small_path)) as slide:
        dims, mpp = slide.dimensions, float(slide.properties["openslide.mpp-x"])
    with openslide.OpenSlide(str(path)) as overlay:
        assert overlay.dimensions == dims and overlay.level_count == len(info["levels_wh"]) > 3
        assert float(overlay.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
    with tiffslide.TiffSlide(path) as overlay:
        assert overlay.dimensions == dims
    # every sampled level-0 pixel holds the heatmap.tif cell under its centre
    cells = tifffile.imread(cmu_job[0] / "heatmap.tif", key=0)
    base = tifffile.imread(path, key=0)
    hm_ds = cmu_job[1]["heatmap"]["hm_downsample"]
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, dims[0], 500), rng.integers(0, dims[1], 500)
    expected = cells[((ys + 0.5) / hm_ds).astype(int), ((xs + 0.5) / hm_ds).astype(int)]
    np.testing.assert_array_equal(base[ys, xs], expected)
    assert (expected != NODATA).any() and (expected == NODATA).any()


def test_colour_map_with_the_analysed_mask_as_alpha(cmu_job: tuple[Path, dict]) -> None:
    path, info = _write(cmu_job, "turbo.tif", colormap="turbo", opacity=0.5)
    hm = cmu_job[1]["heatmap"]
    d = info["downsample"]
    assert d == default_downsample(hm["hm_downsample"]) == 16  # 16.03 l0 px per cell
    rgba = tifffile.imread(path, key=0)
    w, h = hm["l0_size_wh"]
    assert rgba.shape == (-(-h // d), -(-w // d), 4)
    cells = tifffile.imread(cmu_job[0] / "heatmap.tif", key=0)
    ys, xs = np.mgrid[0 : rgba.shape[0], 0 : rgba.shape[1]]
    under = cells[np.minimum(((ys + 0.5) * d / hm["hm_downsample"]).astype(int), cells.shape[0] - 1),
                  np.minimum(((xs + 0.5) * d / hm["hm_downsample"]).astype(int), cells.shape[1] - 1)]
    covered = under != NODATA
    np.testing.assert_array_equal(rgba[..., 3], np.where(covered, 128, 0))
    prob = ((under[covered].astype(int) - 1) * 255) // 254
    np.testing.assert_array_equal(rgba[..., :3][covered], colormap_lut("turbo")[prob])
    with openslide.OpenSlide(str(path)) as overlay:  # OpenSlide reads the RGBA pyramid too
        assert overlay.dimensions == (rgba.shape[1], rgba.shape[0])
        assert float(overlay.properties["openslide.mpp-x"]) == pytest.approx(info["mpp"], rel=1e-3)


@pytest.mark.parametrize(("kw", "message"), [
    ({"colormap": "rainbow"}, "colormap must be"),
    ({"opacity": 1.5}, "opacity must be"),
    ({"downsample": 0}, "downsample must be"),
])
def test_bad_requests_are_refused(cmu_job: tuple[Path, dict], kw: dict, message: str) -> None:
    with pytest.raises(SlideFrameError, match=message):
        _write(cmu_job, "bad.tif", **kw)
    assert not (cmu_job[0] / "bad.tif").exists()


def test_too_large_a_base_level_is_refused(cmu_job: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    import service.outputs.slide_frame as sf

    monkeypatch.setattr(sf, "MAX_BASE_PIXELS", 1_000_000)
    with pytest.raises(SlideFrameError, match="ask for downsample 2 or more"):
        _write(cmu_job, "big.tif", downsample=1)
