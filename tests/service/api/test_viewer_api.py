"""Deep Zoom routes and viewer pages through the real app (real Redis, a real uploaded slide, a finished job)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import constants
from service.api import create_app
from service.jobs.queue import JobQueue, connect
from service.jobs.storage import job_dir
from service.outputs.deepzoom import (
    DZI_NAMESPACE,
    DeepZoomGeometry,
    colormap_lut,
    encode_tile,
    render_slide_tile,
)
from service.outputs.stitching import HeatmapBand, HeatmapGrid, write_heatmap_tiff
from service.settings import Settings
from service.slide.wsi import open_slide
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
CMU_WH = (2220, 2967)
HM_DS = 16.0
SQUARE_HM = (40, 60, 60, 90)  # heatmap cells x0, y0, x1, y1 with p = 0.9: l0 x 640..960, y 960..1440


@pytest.fixture()
def app_settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path, redis_url, tmp_path / "models")


@pytest.fixture()
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as c:
        yield c


@pytest.fixture()
def slide_id(client: TestClient, slides_dir: Path) -> str:
    resp = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE},
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code in (200, 201), resp.text
    return str(resp.json()["slide_id"])


def make_finished_job(settings: Settings, slide_id: str, job_id: str = "ab" * 16) -> str:
    """A done job as the workers leave it: the record in Redis, heatmap.tif and result.json in its folder."""
    folder = job_dir(settings.jobs_dir, job_id)
    folder.mkdir(parents=True)
    grid = HeatmapGrid(CMU_WH, HM_DS)
    hm_w, hm_h = grid.hm_size_wh
    prob = np.full((hm_h, hm_w), 0.2, np.float32)
    x0, y0, x1, y1 = SQUARE_HM
    prob[y0:y1, x0:x1] = 0.9
    covered = np.zeros((hm_h, hm_w), bool)
    covered[20:150, 10:120] = True
    write_heatmap_tiff(folder / "heatmap.tif", [HeatmapBand(0, prob, covered)], grid, l0_mpp=0.499,
                       description="test")
    (folder / "result.json").write_text(json.dumps({"heatmap": {"hm_downsample": HM_DS}}))
    queue = JobQueue(connect(settings.redis_url), settings)
    record, created = queue.submit(job_id, {"slide_id": slide_id, "slide_file": "", "model": "m",
                                            "model_sha256": "c" * 64, "options": "{}", "mpp": ""})
    assert created
    assert queue.transition(job_id, record["generation"], constants.STATE_QUEUED, constants.STATE_DONE)
    return job_id


def _decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img[..., [2, 1, 0, 3]] if img.shape[-1] == 4 else img[..., ::-1]


def test_slide_dzi_descriptor_and_caching(client: TestClient, slide_id: str) -> None:
    resp = client.get(f"/v1/slides/{slide_id}.dzi")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.text)
    assert root.tag == f"{{{DZI_NAMESPACE}}}Image"
    assert root.attrib == {"TileSize": "254", "Overlap": "1", "Format": "jpeg"}
    size = root.find(f"{{{DZI_NAMESPACE}}}Size")
    assert size is not None and (int(size.attrib["Width"]), int(size.attrib["Height"])) == CMU_WH
    etag = resp.headers["etag"]
    assert "max-age" in resp.headers["cache-control"]
    again = client.get(f"/v1/slides/{slide_id}.dzi", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    # the slide's own record is still reachable next to the descriptor
    assert client.get(f"/v1/slides/{slide_id}").json()["slide_id"] == slide_id


def test_slide_tiles_have_dzi_geometry_and_real_pixels(client: TestClient, slide_id: str,
                                                       slides_dir: Path) -> None:
    geo = DeepZoomGeometry(CMU_WH)
    with open_slide(slides_dir / SLIDE) as slide:
        for level, col, row in [(12, 0, 0), (12, 8, 11), (11, 2, 3), (8, 0, 0), (0, 0, 0)]:
            resp = client.get(f"/v1/slides/{slide_id}_files/{level}/{col}_{row}.jpeg")
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"] == "image/jpeg"
            tile = _decode(resp.content)
            w, h = geo.tile_region(level, col, row).dz_size_wh
            assert tile.shape == (h, w, 3)
            expected = render_slide_tile(slide, geo, level, col, row)
            assert resp.content == encode_tile(expected, "jpeg"), "served JPEG is not the rendered tile"
            lossless = client.get(f"/v1/slides/{slide_id}_files/{level}/{col}_{row}.png")
            assert (_decode(lossless.content) == expected).all()
    png = client.get(f"/v1/slides/{slide_id}_files/12/4_5.png")
    jpg = client.get(f"/v1/slides/{slide_id}_files/12/4_5.jpg")
    assert png.headers["content-type"] == "image/png" and jpg.headers["content-type"] == "image/jpeg"
    assert _decode(png.content).shape == (256, 256, 3)
    assert _decode(png.content).std() > 10, "an H&E tile is not blank"


def test_slide_tile_etag_round_trip_and_errors(client: TestClient, slide_id: str) -> None:
    url = f"/v1/slides/{slide_id}_files/12/1_1.jpeg"
    first = client.get(url)
    etag = first.headers["etag"]
    assert first.headers["cache-control"].startswith("public")
    assert client.get(url).content == first.content, "the server-side tile cache returns the same bytes"
    cached = client.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.headers["etag"] == etag
    other = client.get(f"/v1/slides/{slide_id}_files/12/1_2.jpeg")
    assert other.headers["etag"] != etag
    for bad in ("13/0_0.jpeg", "12/9_0.jpeg", "12/0_12.jpeg", "0/1_0.jpeg"):
        resp = client.get(f"/v1/slides/{slide_id}_files/{bad}")
        assert resp.status_code == 404, bad
        assert resp.json()["error"] == "TileNotFound", resp.text
    unknown = client.get(f"/v1/slides/{'0' * 64}_files/12/0_0.jpeg")
    assert unknown.status_code == 404 and unknown.json()["error"] == "SlideNotFound"
    assert client.get(f"/v1/slides/{'0' * 64}.dzi").status_code == 404
    assert client.get(f"/v1/slides/{slide_id}_files/12/0_0.gif").status_code == 422


def test_slide_deepzoom_info_has_mpp_for_the_scale_bar(client: TestClient, slide_id: str) -> None:
    info = client.get(f"/v1/slides/{slide_id}/deepzoom").json()
    assert (info["width"], info["height"]) == CMU_WH
    assert info["level_count"] == 13 and info["dzi"] == f"/v1/slides/{slide_id}.dzi"  # Deep Zoom levels
    assert info["slide_level_count"] == 1 and info["slide_level_sizes_wh"] == [list(CMU_WH)]  # the file's own
    assert info["mpp_x"] == pytest.approx(0.499, abs=1e-3)
    assert info["pixels_per_meter"] == pytest.approx(1e6 / 0.499, rel=1e-3)


def test_overlay_of_a_finished_job_aligns_with_the_slide(client: TestClient, app_settings: Settings,
                                                         slide_id: str) -> None:
    job_id = make_finished_job(app_settings, slide_id)
    dzi = client.get(f"/v1/jobs/{job_id}/overlay.dzi", params={"cmap": "jet", "threshold": 0.5})
    assert dzi.status_code == 200, dzi.text
    root = ET.fromstring(dzi.text)
    size = root.find(f"{{{DZI_NAMESPACE}}}Size")
    assert root.attrib["Format"] == "png"
    assert size is not None and (int(size.attrib["Width"]), int(size.attrib["Height"])) == CMU_WH  # = the slide
    geo = DeepZoomGeometry(CMU_WH)
    x0, y0, x1, y1 = (int(v * HM_DS) for v in SQUARE_HM)
    hot = colormap_lut("jet")[round(0.9 * 255)]
    for col, row in [(2, 3), (3, 4), (3, 5)]:  # tiles around the square at full resolution
        resp = client.get(f"/v1/jobs/{job_id}/overlay_files/12/{col}_{row}.png", params={"threshold": 0.5})
        assert resp.status_code == 200, resp.text
        rgba = _decode(resp.content)
        tile = geo.tile_region(12, col, row)
        assert rgba.shape == (tile.dz_size_wh[1], tile.dz_size_wh[0], 4)
        l0_x = tile.l0_xy[0] + np.arange(rgba.shape[1])
        l0_y = tile.l0_xy[1] + np.arange(rgba.shape[0])
        inside = ((l0_y >= y0) & (l0_y < y1))[:, None] & ((l0_x >= x0) & (l0_x < x1))[None, :]
        assert ((rgba[..., 3] == 255) == inside).all(), f"overlay tile {col}_{row} is not where the square is"
        assert (np.abs(rgba[inside][:, :3].astype(int) - hot.astype(int)) <= 1).all()
    low = _decode(client.get(f"/v1/jobs/{job_id}/overlay_files/12/1_1.png", params={"threshold": 0.1}).content)
    assert (low[..., 3] == 255).any(), "the analysed 0.2 background shows at threshold 0.1"
    outside = _decode(client.get(f"/v1/jobs/{job_id}/overlay_files/12/8_11.png", params={"threshold": 0}).content)
    assert (outside[..., 3] == 0).all(), "cells not analysed stay transparent"


def test_overlay_tile_caching_and_errors(client: TestClient, app_settings: Settings, slide_id: str) -> None:
    job_id = make_finished_job(app_settings, slide_id)
    url = f"/v1/jobs/{job_id}/overlay_files/11/1_2.png"
    first = client.get(url, params={"cmap": "viridis", "threshold": 0.3})
    assert first.status_code == 200 and first.headers["cache-control"].startswith("public")
    etag = first.headers["etag"]
    again = client.get(url, params={"cmap": "viridis", "threshold": 0.3}, headers={"If-None-Match": etag})
    assert again.status_code == 304
    recoloured = client.get(url, params={"cmap": "gray", "threshold": 0.3})
    assert recoloured.headers["etag"] != etag and recoloured.content != first.content
    assert client.get(url, params={"cmap": "nope"}).status_code == 422
    assert client.get(url, params={"threshold": 2}).status_code == 422
    assert client.get(f"/v1/jobs/{job_id}/overlay_files/13/0_0.png").status_code == 404
    missing = client.get(f"/v1/jobs/{'cd' * 16}/overlay_files/0/0_0.png")
    assert missing.status_code == 404 and missing.json()["error"] == "JobNotFound"


def test_viewer_pages_and_assets(client: TestClient, slide_id: str) -> None:
    index = client.get("/")
    assert index.status_code == 200 and "upload-form" in index.text
    page = client.get(f"/viewer/{slide_id}", params={"job": "ab" * 16})
    assert page.status_code == 200 and "/static/openseadragon/openseadragon.min.js" in page.text
    assert client.get(f"/viewer/{'0' * 64}").status_code == 404
    osd = client.get("/static/openseadragon/openseadragon.min.js")
    assert osd.status_code == 200 and "OpenSeadragon" in osd.text[:2000]
    assert client.get("/static/openseadragon/images/home_rest.png").headers["content-type"] == "image/png"
    script = client.get("/static/viewer/viewer.js")
    assert script.status_code == 200 and "overlay.dzi" in script.text
    for sneaky in ("/static/viewer/..%2F..%2Fsettings.py", "/static/viewer/../api/app.py",
                   "/static/openseadragon/..%2F..%2F..%2Fpackage.json"):
        assert client.get(sneaky).status_code == 404, sneaky


def test_a_job_version_heatmap_is_loaded_once_under_concurrent_tiles(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from service.api.routes import tiles
    from service.outputs.deepzoom import ArrayHeatmap

    calls = []
    real = ArrayHeatmap(np.zeros((4, 4), np.float32), 16.0)

    def slow_load(folder: Path, record: dict[str, str]) -> ArrayHeatmap:
        calls.append(threading.get_ident())
        time.sleep(0.2)  # a partial heatmap is stitched from every chunk file: slow on a big slide
        return real

    monkeypatch.setattr(tiles, "load_heatmap", slow_load)
    state = tiles.TileState()
    key = ("job", "1", "running", "3")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: tiles.heatmap_for(state, key, tmp_path, {}), range(8)))
    assert len(calls) == 1 and all(g is real for g in got)
    tiles.heatmap_for(state, ("job", "1", "running", "4"), tmp_path, {})
    assert len(calls) == 2, "a new chunk makes a new version"
    assert state.loading == {}


def test_api_docs_load_swagger_ui_from_this_server(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    scripts = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert "/static/swagger/swagger-ui-bundle.js" in scripts and "/static/swagger/swagger-ui.css" in scripts
    assert all(s.startswith("/") for s in scripts), scripts  # nothing from a CDN: /docs works offline
    bundle = client.get("/static/swagger/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in bundle.text[-200_000:] or "SwaggerUIBundle" in bundle.text[:200_000]
    assert client.get("/static/swagger/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/swagger/..%2F..%2Fpackage.json").status_code == 404
    assert client.get("/redoc").status_code == 404  # ReDoc would come from a CDN: not offered
