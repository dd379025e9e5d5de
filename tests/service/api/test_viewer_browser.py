"""A real headless Chromium loads the built-in viewer on a finished job served by a real uvicorn.

Checks that the slide and the heatmap overlay actually drew (non-blank canvas, overlay colours in the
screenshot); the screenshots are kept under `tests/_artifacts/` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.jobs.worker import Worker
from service.outputs.deepzoom import colormap_lut
from service.settings import Settings
from tests.service.shell import live_app

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
ARTIFACTS = Path(__file__).resolve().parents[2] / "_artifacts"
# small regions, so that a dense job on CMU-1-Small-Region lands in several chunks the page can follow
LIVE_OPTIONS = '{"region_tiles": 2}'
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def need_browser() -> None:
    """Fail in CI (it installs chromium), skip elsewhere, when the browser or Playwright is missing."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append("Debian's chromium (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture()
def server(settings: Settings) -> Iterator[str]:
    """The app on a real uvicorn, on a free loopback port."""
    with live_app(settings) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def finished_job(server: str, settings: Settings, slides_dir: Path) -> tuple[str, str]:
    """Upload the slide through the one-shot endpoint and let a real worker run the job to the end."""
    resp = httpx.post(f"{server}/v1/analyze", content=(slides_dir / SLIDE).read_bytes(),
                      params={"filename": SLIDE}, headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    worker = Worker(settings, name="browser-test")
    worker.run(burst=True)
    state = httpx.get(f"{server}/v1/jobs/{job['job_id']}").json()["state"]
    assert state == "done", state
    return job["slide_id"], job["job_id"]


def _osd_box(page: object) -> dict[str, float]:
    box = page.locator("#osd").bounding_box()  # type: ignore[attr-defined]
    assert box is not None
    return box  # type: ignore[no-any-return]


def _crop(png: bytes, box: dict[str, float]) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
    return img[y + 4:y + h - 4, x + 4:x + w - 4].astype(np.int32)


def _settle(page: object) -> None:
    """Wait until OpenSeadragon has no tile left to load or draw."""
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => window.pixelcamViewer && window.pixelcamViewer.world.getItemCount() > 0"
        " && !window.pixelcamViewer.world.needsDraw()"
        " && Array.from({length: window.pixelcamViewer.world.getItemCount()},"
        "   (_, i) => window.pixelcamViewer.world.getItemAt(i).getFullyLoaded()).every(Boolean)",
        timeout=60_000,
    )
    page.wait_for_timeout(500)  # type: ignore[attr-defined]


def test_viewer_draws_slide_and_overlay_in_chromium(server: str, finished_job: tuple[str, str],
                                                    slides_dir: Path) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    slide_id, job_id = finished_job
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            page.on("response", lambda r: console.append(f"error: HTTP {r.status} {r.url}") if r.status >= 400 else None)
            page.goto(f"{server}/viewer/{slide_id}?job={job_id}&cmap=jet&threshold=0&opacity=1")
            page.wait_for_function(
                "() => window.pixelcam && pixelcam.tilesLoaded.slide > 0 && pixelcam.tilesLoaded.overlay > 0"
                " && pixelcam.result && pixelcam.result.classification && pixelcam.overlayVersion"
                " && pixelcam.overlayVersion.startsWith('done')"
                " && pixelcamViewer.world.getItemCount() === 2", timeout=60_000)
            _settle(page)
            with_overlay = page.screenshot(path=str(ARTIFACTS / "viewer_overlay.png"), full_page=False)
            state = page.evaluate("() => ({errors: pixelcam.errors, tiles: pixelcam.tilesLoaded,"
                                  " outlines: pixelcam.outlines.length, items: pixelcamViewer.world.getItemCount(),"
                                  " klass: document.getElementById('result-class').textContent,"
                                  " scale: document.querySelector('#scalebar .label').textContent,"
                                  " scaleHidden: document.getElementById('scalebar').hidden})")
            # the drawing canvas itself: not blank, and not a single colour
            canvas = page.evaluate(
                "() => { const c = pixelcamViewer.drawer.canvas; const d = c.getContext('2d')"
                ".getImageData(0, 0, c.width, c.height).data; let lit = 0, n = 0;"
                " for (let i = 0; i < d.length; i += 4 * 97) { n++; if (d[i + 3] > 0 &&"
                " (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235)) lit++; } return lit / n; }")
            page.uncheck("#show-overlay")
            _settle(page)
            slide_only = page.screenshot(path=str(ARTIFACTS / "viewer_slide.png"), full_page=False)
            box = _osd_box(page)
            # the start page lists the job with a link into the viewer
            page.goto(f"{server}/")
            page.wait_for_selector(f"a[href='/viewer/{slide_id}?job={job_id}']", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "index.png"), full_page=False)
            listed = page.locator("#jobs").inner_text()
            # the upload form starts the analysis (same bytes and model: the existing job) and opens the viewer
            page.set_input_files("#upload-file", str(slides_dir / SLIDE))
            page.click("#upload-button")
            page.wait_for_url(f"**/viewer/{slide_id}?job={job_id}", timeout=60_000)
        finally:
            browser.close()
    assert not state["errors"], state["errors"]
    assert job_id[:12] in listed and "done" in listed
    assert not [c for c in console if c.startswith(("error", "pageerror"))], console
    assert state["items"] == 2 and state["tiles"]["slide"] > 0 and state["tiles"]["overlay"] > 0
    assert state["klass"].strip() and state["scaleHidden"] is False and ("µm" in state["scale"] or "mm" in state["scale"])
    assert canvas > 0.2, f"canvas mostly blank ({canvas:.2f} of samples drawn)"
    geojson = httpx.get(f"{server}/v1/jobs/{job_id}/geojson").json()
    annotations = [f for f in geojson["features"] if f["properties"].get("objectType", "annotation") == "annotation"]
    assert state["outlines"] == len(annotations), "every GeoJSON annotation is outlined"

    slide_px = _crop(slide_only, box)
    overlay_px = _crop(with_overlay, box)
    # the slide drew: H&E-stained pixels (clearly darker than the white background, pink/purple hue)
    stained = (slide_px.sum(axis=2) < 600) & (slide_px[..., 0] > slide_px[..., 1])
    assert stained.mean() > 0.05, f"only {stained.mean():.3f} of the viewer shows stained tissue"
    # the overlay drew on top: many pixels changed, and the changed ones carry colour-map (jet) colours
    changed = np.abs(overlay_px - slide_px).sum(axis=2) > 60
    assert changed.mean() > 0.05, f"overlay changed only {changed.mean():.3f} of the view"
    lut = colormap_lut("jet").astype(np.int32)
    sample = overlay_px[changed][:: max(1, int(changed.sum()) // 4000)]
    dist = np.abs(sample[:, None, :] - lut[None, :, :]).sum(axis=2).min(axis=1)
    # The browser interpolates between neighbouring heatmap cells when it upsamples an overlay tile; between two
    # far-apart map values (a trained model's map is high-contrast) the blend leaves the jet curve, so a good
    # fraction of changed pixels sit off it. The slide itself (pink/purple/white) is almost never within 45.
    assert (dist <= 45).mean() > 0.6, "changed pixels do not look like the jet colour map"
    slide_dist = np.abs(slide_px[changed][:: max(1, int(changed.sum()) // 4000)][:, None, :] - lut[None]).sum(axis=2).min(axis=1)
    assert (dist <= 45).mean() > (slide_dist <= 45).mean() + 0.3, "the overlay is no closer to jet than the slide"


def _coverage(with_overlay: bytes, slide_only: bytes, box: dict[str, float]) -> float:
    """Fraction of the view that the overlay changed."""
    return float((np.abs(_crop(with_overlay, box) - _crop(slide_only, box)).sum(axis=2) > 60).mean())


def test_viewer_follows_a_running_job_live(server: str, settings: Settings, slides_dir: Path) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    resp = httpx.post(f"{server}/v1/analyze", content=(slides_dir / SLIDE).read_bytes(),
                      params={"filename": SLIDE, "options": LIVE_OPTIONS}, headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert resp.status_code == 202, resp.text
    slide_id, job_id = resp.json()["slide_id"], resp.json()["job_id"]
    ARTIFACTS.mkdir(exist_ok=True)
    worker = Worker(settings, name="browser-live")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{server}/viewer/{slide_id}?job={job_id}&cmap=jet&threshold=0&opacity=1")
            page.wait_for_function("() => window.pixelcam && pixelcam.job && pixelcam.job.state === 'queued'",
                                   timeout=30_000)
            for kind in ("plan", "chunk"):  # the worker does the plan and one chunk, then pauses
                msg = worker.queue.read(worker.name, 200)
                assert msg is not None and msg.kind == kind
                worker.handle(msg)
            # the page hears the progress event and swaps in the partial overlay by itself
            page.wait_for_function("() => pixelcam.overlayVersion === 'running-1'"
                                   " && pixelcamViewer.world.getItemCount() === 2", timeout=30_000)
            _settle(page)
            status = page.locator("#job-state").inner_text()
            partial = page.screenshot(path=str(ARTIFACTS / "viewer_running.png"))
            page.uncheck("#show-overlay")
            _settle(page)
            slide_only = page.screenshot()
            page.check("#show-overlay")
            worker.run(burst=True)
            page.wait_for_function("() => (pixelcam.overlayVersion || '').startsWith('done') && pixelcam.result"
                                   " && pixelcam.result.classification && pixelcamViewer.world.getItemCount() === 2",
                                   timeout=60_000)
            _settle(page)
            final = page.screenshot(path=str(ARTIFACTS / "viewer_finished.png"))
            final_status = page.locator("#job-state").inner_text()
            errors = page.evaluate("() => pixelcam.errors")
            box = _osd_box(page)
        finally:
            worker.close()
            browser.close()
    assert "running" in status and "tiles" in status, status
    assert final_status.startswith("done"), final_status
    assert not errors, errors
    part, full = _coverage(partial, slide_only, box), _coverage(final, slide_only, box)
    assert part > 0.005, f"the first chunk did not show ({part:.4f} of the view)"
    assert full > 2 * part, f"the overlay did not fill in ({part:.4f} -> {full:.4f})"


def test_a_job_mpp_override_drives_the_scale_bar_and_levels_are_the_slides(
    server: str, settings: Settings, slides_dir: Path
) -> None:
    """A slide without resolution metadata (kidney-48-5.tif) analysed with `mpp`: the viewer uses the job's mpp."""
    need_browser()
    from playwright.sync_api import sync_playwright

    name = "kidney-48-5.tif"
    resp = httpx.post(f"{server}/v1/analyze", content=(slides_dir / name).read_bytes(),
                      params={"filename": name, "mpp": 2.0}, headers={"Content-Type": "application/octet-stream"},
                      timeout=60)
    assert resp.status_code == 202, resp.text
    slide_id, job_id = resp.json()["slide_id"], resp.json()["job_id"]
    info = httpx.get(f"{server}/v1/slides/{slide_id}/deepzoom").json()
    assert info["mpp_x"] is None and info["slide_level_count"] == 1 and info["level_count"] > 1
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{server}/viewer/{slide_id}?job={job_id}")
            page.wait_for_function("() => window.pixelcam && pixelcam.job && pixelcam.job.mpp === 2"
                                   " && !document.getElementById('scalebar').hidden", timeout=60_000)
            table = page.locator("#slide-info").inner_text()
            label = page.locator("#scalebar .label").inner_text()
        finally:
            browser.close()
    assert "2.0000 (job's mpp override)" in table and "unknown" not in table
    assert "1 in the file" in table
    assert "µm" in label or "mm" in label
