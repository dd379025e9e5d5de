"""Faults: Redis restarted empty, Redis down, the disk filling up, the model file replaced in the middle of a job.

The worker SIGKILLed in the middle of a chunk and Redis restarted with persistence are in `test_worker.py`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import redis
from fastapi.testclient import TestClient

from service import constants
from service.api import create_app
from service.errors import QueueUnavailable
from service.jobs.redis_server import PrivateRedis
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.shell import REPO_ROOT, make_settings, process_alive

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
BUSY = {"overlap": 0.5, "write_detections": False}  # about 80 tiles in 4-tile chunks


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def submit(client: TestClient, slides_dir: Path, options: dict[str, Any]) -> str:
    slide = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
    assert slide.status_code in (200, 201), slide.text
    job = client.post("/v1/jobs", json={"slide_id": slide.json()["slide_id"], "options": options})
    assert job.status_code in (200, 202), job.text
    return str(job.json()["job_id"])


def state(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]


def finished(client: TestClient, job_id: str) -> dict[str, Any] | None:
    s = state(client, job_id)
    return s if s.get("state") in constants.TERMINAL_STATES else None


def test_redis_restarted_without_persistence_fails_loudly_and_serves_on(tmp_path: Path, shell_models_dir: Path,
                                                                        slides_dir: Path) -> None:
    server = PrivateRedis(tmp_path / "redis-volatile", persist=False)
    url = server.start()
    log = (tmp_path / "worker.log").open("wb")
    settings = make_settings(tmp_path, url, shell_models_dir)
    worker = subprocess.Popen([sys.executable, "-m", "service.jobs.worker"], cwd=REPO_ROOT, stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ, **settings.to_env()))
    try:
        with TestClient(create_app(settings)) as client:
            job_id = submit(client, slides_dir, BUSY)
            wait_for("some progress", lambda: state(client, job_id)["tiles_done"] >= 4)
            server.stop()
            down = client.get(f"/v1/jobs/{job_id}")  # Redis gone: a clear 503, promptly, not a hang or a 500
            assert down.status_code == 503 and down.json()["error"] == "QueueUnavailable"
            assert down.headers["retry-after"] == "5"
            server.start()  # same port, nothing remembered
            lost = client.get(f"/v1/jobs/{job_id}")
            assert lost.status_code == 410 and lost.json()["error"] == "JobLost"
            assert "submit it again" in lost.json()["detail"]
            assert client.get(f"/v1/jobs/{job_id}/result").status_code == 404
            again = submit(client, slides_dir, BUSY)  # the same request is the same job, run afresh
            assert again == job_id
            done = wait_for("the resubmitted job", lambda: finished(client, job_id))
            assert done["state"] == constants.STATE_DONE and done["tiles_done"] == done["tiles_total"]
            assert worker.poll() is None  # the worker survived the empty Redis
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        server.stop()
    assert "the queue is gone from Redis" in (tmp_path / "worker.log").read_text()


def test_a_hung_redis_fails_requests_within_the_timeout_and_recovers(tmp_path: Path, shell_models_dir: Path,
                                                                     slides_dir: Path) -> None:
    server = PrivateRedis(tmp_path / "redis-hung", persist=False)
    url = server.start()
    settings = make_settings(tmp_path, url, shell_models_dir, redis_timeout_s=0.5)
    pid = int(redis.Redis.from_url(url).info("server")["process_id"])
    try:
        with TestClient(create_app(settings)) as client:
            job_id = submit(client, slides_dir, {"write_detections": False})
            os.kill(pid, signal.SIGSTOP)  # Redis accepts connections but never answers
            try:
                t0 = time.monotonic()
                hung = client.get(f"/v1/jobs/{job_id}")
                waited = time.monotonic() - t0
                ready = client.get("/readyz")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert hung.status_code == 503 and hung.json()["error"] == "QueueUnavailable"
            assert waited < 30  # bounded by PIXELCAM_REDIS_TIMEOUT_S and the client's few retries, not forever
            assert ready.status_code == 503 and "unreachable" in ready.json()["checks"]["redis"]
            assert state(client, job_id)["state"] == constants.STATE_QUEUED  # answered again once Redis is back
            Worker(settings).run(burst=True)
            assert state(client, job_id)["state"] == constants.STATE_DONE
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["chunk", "results"])
def test_a_full_disk_fails_the_job_cleanly(client: TestClient, settings: Settings, slides_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import service.analysis.finalize
    import service.jobs.worker

    def no_space(*args: Any, **kwargs: Any) -> None:
        if where == "results":  # the disk fills while the GeoJSON is half written
            Path(args[0]).write_text('{"type": "FeatureCollection", "features": [')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "chunk":
        monkeypatch.setattr(service.jobs.worker, "save_chunk", no_space)  # the worker writes chunk files
    else:
        monkeypatch.setattr(service.analysis.finalize, "write_geojson", no_space)
    job_id = submit(client, slides_dir, {"write_detections": False})
    worker = Worker(settings)
    deadline = time.monotonic() + 60
    while finished(client, job_id) is None:  # bounded retries, each after claim_idle_s
        assert time.monotonic() < deadline
        worker.run(burst=True)
        time.sleep(0.2)
    failed = state(client, job_id)
    assert failed["state"] == constants.STATE_FAILED
    assert "No space left on device" in failed["error"] and "storage is full" in failed["error"]
    for result in ("result", "geojson", "heatmap.png", "heatmap.tif"):
        resp = client.get(f"/v1/jobs/{job_id}/{result}")
        assert resp.status_code == 409 and "failed" in resp.json()["detail"], result
    assert not (settings.jobs_dir / job_id / "result.json").exists()
    monkeypatch.undo()  # space is freed: the same job runs again and completes
    assert client.post("/v1/jobs", json={"slide_id": failed["slide_id"],
                                         "options": {"write_detections": False}}).status_code == 202
    Worker(settings).run(burst=True)
    assert state(client, job_id)["state"] == constants.STATE_DONE
    assert client.get(f"/v1/jobs/{job_id}/geojson").json()["type"] == "FeatureCollection"


def replace_model(path: Path) -> str:
    """Swap the model file for a different valid one (same network, other provenance); returns its sha256."""
    import hashlib

    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "pixelcam":
            meta = json.loads(prop.value)
            meta["provenance"]["export_date"] = "2000-01-01T00:00:00Z"
            prop.value = json.dumps(meta)
    tmp = path.with_suffix(".swap")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_some(worker: Worker, n: int) -> None:
    for _ in range(n):
        msg = worker.queue.read(worker.name, 100)
        assert msg is not None
        worker.handle(msg)


@pytest.mark.parametrize("after", ["same-worker", "fresh-worker"])
def test_a_model_replaced_mid_job_is_never_mixed(client: TestClient, settings: Settings, slides_dir: Path,
                                                 after: str) -> None:
    job_id = submit(client, slides_dir, BUSY)
    started_with = state(client, job_id)["model_sha256"]
    first = Worker(settings)
    run_some(first, 3)  # the plan and two chunks with the submitted model
    assert state(client, job_id)["chunks_done"] == 2
    new_sha = replace_model(settings.models_dir / "random.onnx")
    assert new_sha != started_with
    if after == "same-worker":  # it holds the model it loaded: the job finishes with it, and says so
        first.run(burst=True)
        done = state(client, job_id)
        assert done["state"] == constants.STATE_DONE and done["model_sha256"] == started_with
        result = client.get(f"/v1/jobs/{job_id}/result").json()
        assert result["provenance"]["model"]["sha256"] == started_with
    else:  # a worker that would load the new file refuses: the job fails loudly, no result mixes two models
        Worker(settings).run(burst=True)
        failed = state(client, job_id)
        assert failed["state"] == constants.STATE_FAILED and "changed since the job was submitted" in failed["error"]
        assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
    first.close()
    listed = client.get("/v1/models/random").json()
    assert listed["sha256"] == new_sha and listed["valid"]  # new jobs use the new file


def test_a_slide_gone_from_the_storage_fails_its_job_with_the_reason(client: TestClient, settings: Settings,
                                                                      slides_dir: Path) -> None:
    job_id = submit(client, slides_dir, {"write_detections": False})
    slide_id = state(client, job_id)["slide_id"]
    (settings.slides_dir / slide_id / "slide.svs").unlink()  # someone cleaned the shared storage by hand
    Worker(settings).run(burst=True)
    failed = state(client, job_id)
    assert failed["state"] == constants.STATE_FAILED and "does not exist" in failed["error"]


def test_the_private_redis_dies_with_a_killed_parent_and_is_never_started_twice(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom service.jobs.redis_server import PrivateRedis\n"
         f"r = PrivateRedis(Path({str(data)!r}))\nr.start()\nprint(r.pid, r.url, flush=True)\ntime.sleep(600)\n"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid_text, url = owner.stdout.readline().split()
        server_pid = int(pid_text)
        assert redis.Redis.from_url(url).ping()
        # while it runs, a second server on the same folder (and its append-only file) is refused
        with pytest.raises(QueueUnavailable, match="already running") as refused:
            PrivateRedis(data).start()
        assert str(server_pid) in str(refused.value)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while process_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(server_pid), "the private Valkey outlived the SIGKILLed process that started it"
    finally:
        owner.kill()
        owner.wait(10)
    # the folder is free again: a restart gets its own server, on the data the first one left
    again = PrivateRedis(data)
    again.start()
    try:
        assert redis.Redis.from_url(again.url).ping()
    finally:
        again.stop()
