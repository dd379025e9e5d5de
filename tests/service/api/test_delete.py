"""Real deletes: a job or a slide leaves nothing behind, on disk, in Redis or in the tile caches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service import constants
from service.api.app import create_app
from service.jobs.worker import Worker
from service.settings import Settings

SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _redis_mentions(settings: Settings, *ids: str) -> list[str]:
    """Every key under this deployment's prefix whose name or members mention one of `ids`."""
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    found = []
    for key in r.scan_iter(match=f"{settings.redis_prefix}:*"):
        kind = r.type(key)
        members: list[str] = []
        if kind == "set":
            members = list(r.smembers(key))
        elif kind == "zset":
            members = list(r.zrange(key, 0, -1))
        elif kind == "hash":
            members = list(r.hgetall(key).values())
        if any(i in key or i in members for i in ids):
            found.append(key)
    return found


def _upload(client: TestClient, slides_dir: Path) -> str:
    r = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["slide_id"])


def _submit(client: TestClient, slide_id: str, **options: object) -> str:
    r = client.post("/v1/jobs", json={"slide_id": slide_id, "options": options})
    assert r.status_code in (200, 202), r.text
    return str(r.json()["job_id"])


def test_deleting_a_job_removes_its_results_keys_and_cached_tiles(client: TestClient, settings: Settings,
                                                                    slides_dir: Path) -> None:
    slide_id = _upload(client, slides_dir)
    job_id = _submit(client, slide_id)
    running = client.delete(f"/v1/jobs/{job_id}")
    assert running.status_code == 409 and "cancel it first" in running.json()["detail"]
    Worker(settings).run(burst=True)
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == constants.STATE_DONE
    assert client.get(f"/v1/jobs/{job_id}/overlay_files/0/0_0.png").status_code == 200  # now cached
    assert (settings.jobs_dir / job_id / "heatmap.tif").is_file()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/overlay_files/0/0_0.png").status_code == 404  # not served from cache
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 404
    assert job_id not in [j["job_id"] for j in client.get("/v1/jobs").json()["jobs"]]
    assert not (settings.jobs_dir / job_id).exists() and not list(settings.jobs_dir.glob(".deleting-*"))
    assert _redis_mentions(settings, job_id) == []
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/slides/{slide_id}").status_code == 200  # the slide stays
    # the same request again is a new job, computed afresh
    assert _submit(client, slide_id) == job_id
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == constants.STATE_QUEUED


def test_deleting_a_slide_removes_everything_made_from_it(client: TestClient, settings: Settings,
                                                          slides_dir: Path) -> None:
    slide_id = _upload(client, slides_dir)
    done = _submit(client, slide_id)
    Worker(settings).run(burst=True)
    queued = _submit(client, slide_id, min_tissue=0.5)
    assert client.get(f"/v1/slides/{slide_id}_files/0/0_0.jpeg").status_code == 200  # cached slide tile
    refused = client.delete(f"/v1/slides/{slide_id}")
    assert refused.status_code == 409 and queued in refused.json()["detail"]
    assert (settings.slides_dir / slide_id).is_dir() and (settings.jobs_dir / done).is_dir()  # nothing went
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["state"] == constants.STATE_CANCELLED
    assert client.delete(f"/v1/slides/{slide_id}").status_code == 204
    assert client.get(f"/v1/slides/{slide_id}").status_code == 404
    assert client.get(f"/v1/slides/{slide_id}_files/0/0_0.jpeg").status_code == 404
    for job_id in (done, queued):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert not (settings.jobs_dir / job_id).exists()
    assert not (settings.slides_dir / slide_id).exists()
    assert not list(settings.slides_dir.glob(".deleting-*")) and not list(settings.jobs_dir.glob(".deleting-*"))
    assert _redis_mentions(settings, slide_id, done, queued) == []
    # a worker still holding the cancelled job's messages finds nothing and writes nothing
    Worker(settings).run(burst=True)
    assert not (settings.jobs_dir / queued).exists() and _redis_mentions(settings, queued) == []
    assert client.delete(f"/v1/slides/{slide_id}").status_code == 404


def test_retention_deletes_ended_jobs_and_unused_slides_once_they_are_old(tmp_path: Path, redis_url: str,
                                                                         shell_models_dir: Path,
                                                                         slides_dir: Path) -> None:
    import time

    from tests.service.shell import make_settings

    settings = make_settings(tmp_path, redis_url, shell_models_dir, retention_days=3 / 86400, retention_sweep_s=0.2)
    with TestClient(create_app(settings)) as client:
        slide_id = _upload(client, slides_dir)
        done = _submit(client, slide_id)
        Worker(settings).run(burst=True)
        queued = _submit(client, slide_id, min_tissue=0.5)  # never run: it keeps the slide in use
        deadline = time.monotonic() + 20
        while client.get(f"/v1/jobs/{done}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get(f"/v1/jobs/{done}").status_code == 404 and not (settings.jobs_dir / done).exists()
        assert client.get(f"/v1/jobs/{queued}").json()["state"] == constants.STATE_QUEUED  # unfinished: kept
        assert client.get(f"/v1/slides/{slide_id}").status_code == 200  # a job still uses it
        client.post(f"/v1/jobs/{queued}/cancel")
        while client.get(f"/v1/slides/{slide_id}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get(f"/v1/slides/{slide_id}").status_code == 404
        assert client.get(f"/v1/jobs/{queued}").status_code == 404
        assert not (settings.slides_dir / slide_id).exists()
        assert _redis_mentions(settings, slide_id, done, queued) == []
