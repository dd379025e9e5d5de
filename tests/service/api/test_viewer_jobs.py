"""Overlay tiles of a real job run by a real worker: partial while chunks land, then the finished heatmap TIFF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import constants
from service.analysis.plan import JobPlan
from service.api import create_app
from service.jobs.storage import job_dir
from service.jobs.worker import Worker
from service.outputs.deepzoom import DeepZoomGeometry
from service.settings import Settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
CMU_WH = (2220, 2967)


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _rgba(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape[-1] == 4
    return img[..., [2, 1, 0, 3]]


def _step(worker: Worker, kind: str) -> None:
    """Let the worker handle exactly one message, which must be of `kind`."""
    msg = worker.queue.read(worker.name, 200)
    assert msg is not None and msg.kind == kind, msg
    worker.handle(msg)


def test_overlay_fills_in_while_the_job_runs(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    # dense inference in small regions (2 x 2 tiles), so that the slide's 20 tiles land in several chunks
    resp = client.post("/v1/analyze", content=(slides_dir / SLIDE).read_bytes(),
                       params={"filename": SLIDE, "options": '{"region_tiles": 2}'},
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    job_id = job["job_id"]
    assert job["options"]["inference"] == "auto" and job["options"]["region_tiles"] == 2
    geo = DeepZoomGeometry(CMU_WH)
    z = 8  # 139 x 186 px: the whole slide in one tile
    assert geo.tile_grid_wh(z) == (1, 1)
    url = f"/v1/jobs/{job_id}/overlay_files/{z}/0_0.png"
    params = {"cmap": "jet", "threshold": 0.0}

    empty = client.get(url, params=params)
    assert empty.status_code == 200 and empty.headers["cache-control"] == "no-cache"
    assert (_rgba(empty.content)[..., 3] == 0).all(), "nothing analysed yet"

    worker = Worker(settings, name="viewer-test")
    try:
        _step(worker, constants.MSG_PLAN)
        _step(worker, constants.MSG_CHUNK)
        record = client.get(f"/v1/jobs/{job_id}").json()
        assert record["state"] == constants.STATE_RUNNING and record["chunks_done"] == 1 and record["chunks_total"] >= 3
        one = client.get(url, params=params)
        assert one.headers["etag"] != empty.headers["etag"]
        one_alpha = _rgba(one.content)[..., 3] > 0
        assert one_alpha.any(), "the first chunk's tiles show"
        same = client.get(url, params=params, headers={"If-None-Match": one.headers["etag"]})
        assert same.status_code == 304, "unchanged while no chunk lands"

        _step(worker, constants.MSG_CHUNK)
        two = client.get(url, params=params)
        two_alpha = _rgba(two.content)[..., 3] > 0
        assert two.headers["etag"] != one.headers["etag"]
        assert two_alpha.sum() > one_alpha.sum() and (two_alpha >= one_alpha).all(), "coverage only grows"

        worker.run(burst=True)
    finally:
        worker.close()
    record = client.get(f"/v1/jobs/{job_id}").json()
    assert record["state"] == constants.STATE_DONE, record
    done = client.get(url, params=params)
    assert done.headers["cache-control"].startswith("public")
    final = _rgba(done.content)
    final_alpha = final[..., 3] > 0
    assert (final_alpha >= two_alpha).all() and final_alpha.sum() > two_alpha.sum()
    # the partial overlay (stitched from chunk files) and the final one (the heatmap TIFF) agree where both exist
    partial = _rgba(two.content)
    both = two_alpha & final_alpha
    diff = np.abs(partial[both][:, :3].astype(int) - final[both][:, :3].astype(int))
    assert np.median(diff) <= 8, "partial and final heatmaps disagree"
    # and it lies exactly on the plan's tissue tiles: their level-0 squares, drawn at this level's scale
    plan = JobPlan.load(job_dir(settings.jobs_dir, job_id))
    d = geo.downsample(z)
    footprint = np.zeros(final_alpha.shape, bool)
    interior = np.zeros(final_alpha.shape, bool)
    size = plan.tiles.l0_tile_size
    for l0_x, l0_y in np.asarray(plan.l0_xy):
        x0, y0, x1, y1 = (int(np.floor(l0_x / d)), int(np.floor(l0_y / d)),
                          int(np.ceil((l0_x + size) / d)), int(np.ceil((l0_y + size) / d)))
        footprint[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
        interior[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = True
    assert not (final_alpha & ~footprint).any(), "overlay drawn outside the analysed tiles"
    assert (final_alpha | ~interior).all(), "analysed tiles missing from the overlay"
