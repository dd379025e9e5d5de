"""report.html: self-contained, truthful to result.json, and rendered by a real Chromium with nothing fetched."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from service.analysis.html_report import REPORT_FILE, TOP_REGIONS, write_html_report
from service.analysis.pipeline import analyze_slide
from tests.service.api.test_viewer_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, need_browser


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, cmu_small_path: Path, random_predictor: Any
           ) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    result = analyze_slide(cmu_small_path, random_predictor, out)
    return write_html_report(out, cmu_small_path), result.result


def test_the_report_says_what_result_json_says_and_links_nothing(report: tuple[Path, dict[str, Any]]) -> None:
    path, result = report
    assert path.name == REPORT_FILE
    text = path.read_text()
    # every image inline, no script, no external address anywhere in an attribute
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text) and "<script" not in text
    assert "default-src 'none'" in text
    call = result["classification"]
    assert f"p = {call['probability']:.3f}" in text and call["label"] in text
    ev = result["evidence"]
    for key in ("tissue_area_mm2", "analysed_area_mm2", "positive_area_mm2"):
        assert f"{ev[key]:.3f} mm²" in text
    n_regions = min(TOP_REGIONS, len(ev["top_regions"]))
    assert text.count("<figure><img alt='region") == n_regions > 0
    assert "Research use only" in text and result["provenance"]["slide"]["mpp_source"] in text
    assert result["provenance"]["model"]["sha256"] in text


def test_chromium_renders_it_with_no_request_leaving_the_page(report: tuple[Path, dict[str, Any]]) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    path, result = report
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            loaded = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
            call_text = page.inner_text("#call")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            png = page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert requests == [path.as_uri()], requests  # the page itself and nothing else
    assert loaded and all(loaded) and len(loaded) >= 3
    assert result["classification"]["label"] in call_text
    shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    # the call's box is drawn in its colour (red for the positive class, green otherwise)
    box = np.array([0xFD, 0xE2, 0xE2] if result["classification"]["label"] == result["classification"][
        "positive_class"] else [0xE3, 0xF4, 0xE6])
    assert (np.abs(shot.astype(int) - box).max(axis=-1) <= 2).sum() > 2000
