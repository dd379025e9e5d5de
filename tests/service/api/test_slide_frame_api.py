"""`GET /v1/jobs/{id}/heatmap-slide.tif`: the heatmap in the slide's frame, made on request and kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from fastapi.testclient import TestClient

from service.jobs.storage import SlideStore, job_dir
from service.settings import Settings
from tests.service.api.test_viewer_api import CMU_WH, HM_DS, app_settings, client, make_finished_job, slide_id

__all__ = ["app_settings", "client", "slide_id"]  # fixtures used here

pytestmark = pytest.mark.redis


def test_the_slide_frame_heatmap_has_the_slide_geometry(client: TestClient, app_settings: Settings, slide_id: str,
                                                        tmp_path: Path) -> None:
    job_id = make_finished_job(app_settings, slide_id)
    folder = job_dir(app_settings.jobs_dir, job_id)
    result = {"heatmap": {"hm_downsample": HM_DS, "l0_size_wh": list(CMU_WH)},
              "provenance": {"slide": {"mpp_x": 0.499}}}
    (folder / "result.json").write_text(json.dumps(result))
    resp = client.get(f"/v1/jobs/{job_id}/heatmap-slide.tif", params={"colormap": "likelihood", "downsample": 1})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/tiff"
    path = tmp_path / "l0.tif"
    path.write_bytes(resp.content)
    with tiffslide.TiffSlide(path) as overlay:
        assert overlay.dimensions == CMU_WH
    cells = tifffile.imread(folder / "heatmap.tif", key=0)
    base = tifffile.imread(path, key=0)
    ys, xs = np.array([0, 100, 1500, 2966]), np.array([0, 700, 1100, 2219])
    np.testing.assert_array_equal(base[ys, xs], cells[((ys + 0.5) / HM_DS).astype(int), ((xs + 0.5) / HM_DS).astype(int)])
    # kept with the job's files, one per parameter set; a bad parameter is a 422 that says what works
    assert len(list(folder.glob("heatmap-slide-*.tif"))) == 1
    rgba = client.get(f"/v1/jobs/{job_id}/heatmap-slide.tif")
    assert rgba.status_code == 200 and len(list(folder.glob("heatmap-slide-*.tif"))) == 2
    bad = client.get(f"/v1/jobs/{job_id}/heatmap-slide.tif", params={"colormap": "rainbow"})
    assert bad.status_code == 422 and "colormap must be" in bad.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/heatmap-slide.tif", params={"downsample": 0}).status_code == 422
    assert client.get(f"/v1/jobs/{'cd' * 16}/heatmap-slide.tif").status_code == 404


def test_the_report_of_a_finished_job_is_one_self_contained_page(client: TestClient, app_settings: Settings,
                                                                 slide_id: str, random_predictor: object) -> None:
    from service.analysis.pipeline import analyze_slide

    job_id = make_finished_job(app_settings, slide_id, job_id="ef" * 16)
    folder = job_dir(app_settings.jobs_dir, job_id)
    stored = SlideStore(app_settings.slides_dir).get(slide_id).path
    result = analyze_slide(stored, random_predictor, folder).result  # the files a worker leaves
    resp = client.get(f"/v1/jobs/{job_id}/report")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert f"p = {result['classification']['probability']:.3f}" in resp.text and "src='http" not in resp.text
    assert (folder / "report.html").is_file()
    assert client.get(f"/v1/jobs/{'cd' * 16}/report").status_code == 404
