"""With API keys configured, the built-in viewer still draws slide and overlay in a real Chromium (key given once)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.api.test_viewer_browser import CHROMIUM, CHROMIUM_ARGS, need_browser
from tests.service.shell import live_app, make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
KEY = "viewer-key-0123456789abcdef"


@pytest.fixture()
def keyed_server(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Iterator[tuple[str, Settings]]:
    settings = make_settings(tmp_path, redis_url, shell_models_dir, api_keys=KEY)
    with live_app(settings) as port:
        yield f"http://127.0.0.1:{port}", settings


def test_viewer_works_with_keys_given_once_in_the_address(keyed_server: tuple[str, Settings],
                                                          slides_dir: Path) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    base, settings = keyed_server
    resp = httpx.post(f"{base}/v1/analyze", content=(slides_dir / SLIDE).read_bytes(), timeout=60,
                      params={"filename": SLIDE, "options": json.dumps({"write_detections": False})},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 202, resp.text
    slide_id, job_id = resp.json()["slide_id"], resp.json()["job_id"]
    Worker(settings, name="keyed-browser-test").run(burst=True)
    failures: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 700})
            page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(f"{base}/viewer/{slide_id}?job={job_id}&api_key={KEY}&threshold=0")
            page.wait_for_function(
                "() => window.pixelcam && pixelcam.tilesLoaded.slide > 0 && pixelcam.tilesLoaded.overlay > 0"
                " && pixelcam.result && pixelcam.result.classification", timeout=60_000)
            assert failures == []  # every fetch and tile image carried the key (as the cookie)
            stranger = browser.new_page()  # a fresh context has no cookie: the API refuses it
            stranger.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page_resp = stranger.goto(f"{base}/viewer/{slide_id}?job={job_id}")
            assert page_resp is not None and page_resp.status == 401
        finally:
            browser.close()
    assert failures and all(f.startswith("401 ") for f in failures)
