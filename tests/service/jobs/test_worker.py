"""Jobs end to end on a real Redis, a real slide and real worker processes: round trip, sharing, SIGKILL, cancel."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from service import constants
from service.api import create_app
from service.jobs.queue import JobQueue, Message, connect
from service.jobs.redis_server import PrivateRedis
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.shell import REPO_ROOT, make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
# half-tile overlap: about 80 tiles in 4-tile chunks, so a job lasts long enough to be interrupted
BUSY = {"overlap": 0.5, "write_detections": False}


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def spawn(tmp_path: Path) -> Iterator[Callable[[Settings], subprocess.Popen[bytes]]]:
    """Start `python -m service.jobs.worker` processes with given settings; all are stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        env = dict(os.environ, **settings.to_env())
        proc = subprocess.Popen([sys.executable, "-m", "service.jobs.worker"], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float = 120.0, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def submit(client: TestClient, slides_dir: Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    slide = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
    assert slide.status_code in (200, 201), slide.text
    job = client.post("/v1/jobs", json={"slide_id": slide.json()["slide_id"], "options": options or {}})
    assert job.status_code == 202, job.text
    return job.json()


def job_state(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}").json()


def heatmap(settings: Settings, job_id: str) -> np.ndarray:
    return tifffile.imread(settings.jobs_dir / job_id / "heatmap.tif")


def test_round_trip_results_events_and_idempotent_resubmission(client: TestClient, settings: Settings,
                                                               slides_dir: Path) -> None:
    job = submit(client, slides_dir)
    assert job["state"] == constants.STATE_QUEUED and job["links"]["self"] == f"/v1/jobs/{job['job_id']}"
    assert client.get(f"/v1/jobs/{job['job_id']}/result").status_code == 409  # not done yet
    handled = Worker(settings).run(burst=True)
    assert handled >= 3  # plan, chunks, finalize
    done = job_state(client, job["job_id"])
    assert done["state"] == constants.STATE_DONE, done
    assert done["tiles_done"] == done["tiles_total"] > 0 and done["progress"] == 1.0
    assert sum(done["workers"].values()) == done["chunks_total"]
    assert set(done["timings_s"]) == {"plan", "stitch"} and all(v > 0 for v in done["timings_s"].values())
    model = client.get("/v1/models/random").json()
    result = client.get(f"/v1/jobs/{job['job_id']}/result").json()
    assert result["classification"]["label"] in {"benign", "malignant"}
    assert 0.0 <= result["classification"]["probability"] <= 1.0
    assert result["job"]["model_sha256"] == model["sha256"] == done["model_sha256"]
    assert model["sha256"] in json.dumps(result["provenance"])
    plain = client.get(f"/v1/jobs/{job['job_id']}/geojson")
    assert plain.json()["type"] == "FeatureCollection"
    zipped = client.get(f"/v1/jobs/{job['job_id']}/geojson", params={"download": True})
    assert zipped.headers["content-type"] == "application/gzip"
    assert json.loads(gzip.decompress(zipped.content)) == plain.json()
    png = client.get(f"/v1/jobs/{job['job_id']}/heatmap.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    tif = client.get(f"/v1/jobs/{job['job_id']}/heatmap.tif")
    assert tif.status_code == 200 and tif.content[:2] in (b"II", b"MM")
    events = client.get(f"/v1/jobs/{job['job_id']}/events").text
    assert "event: progress" in events and 'event: end\ndata: {"state": "done"}' in events
    # the same slide, model and parameters (defaults spelled out, speed knobs changed) is the same job
    for options in ({}, {"min_tissue": 0.1, "batch_size": 7}):
        again = client.post("/v1/jobs", json={"slide_id": done["slide_id"], "options": options})
        assert again.status_code == 200 and again.json()["job_id"] == job["job_id"]
        assert again.json()["state"] == constants.STATE_DONE and "result" in again.json()["links"]
    other = client.post("/v1/jobs", json={"slide_id": done["slide_id"], "options": {"min_tissue": 0.5}})
    assert other.status_code == 202 and other.json()["job_id"] != job["job_id"]
    bad = client.post("/v1/jobs", json={"slide_id": done["slide_id"], "options": {"min_tissue": 7}})
    assert bad.status_code == 422 and "min_tissue" in bad.json()["detail"]
    unknown_model = client.post("/v1/jobs", json={"slide_id": done["slide_id"], "model": "nope"})
    assert unknown_model.status_code == 404
    # results lost from the shared storage: the same request runs the job again instead of pointing at nothing
    before = heatmap(settings, job["job_id"])
    shutil.rmtree(settings.jobs_dir / job["job_id"])
    assert client.get(f"/v1/jobs/{job['job_id']}/result").status_code == 409
    rerun = client.post("/v1/jobs", json={"slide_id": done["slide_id"]})
    assert rerun.status_code == 202 and rerun.json()["job_id"] == job["job_id"]
    client.post(f"/v1/jobs/{other.json()['job_id']}/cancel")
    Worker(settings).run(burst=True)
    assert job_state(client, job["job_id"])["state"] == constants.STATE_DONE
    np.testing.assert_array_equal(heatmap(settings, job["job_id"]), before)


def test_two_worker_processes_share_one_slide(client: TestClient, settings: Settings, slides_dir: Path,
                                              spawn: Callable[[Settings], subprocess.Popen[bytes]]) -> None:
    queue = JobQueue(connect(settings.redis_url), settings)
    spawn(settings)
    spawn(settings)
    wait_for("two live workers", lambda: queue.alive_workers() == 2, timeout_s=60)
    job = submit(client, slides_dir, BUSY)
    done = wait_for("the job to finish",
                    lambda: (s := job_state(client, job["job_id"]))["state"] in constants.TERMINAL_STATES and s)
    assert done["state"] == constants.STATE_DONE, done
    assert len(done["workers"]) == 2 and all(n > 0 for n in done["workers"].values()), done["workers"]
    assert sum(done["workers"].values()) == done["chunks_total"]


def test_sigkilled_worker_mid_job_gives_the_same_heatmap(client: TestClient, settings: Settings, tmp_path: Path,
                                                          redis_url: str, shell_models_dir: Path, slides_dir: Path,
                                                          spawn: Callable[[Settings], subprocess.Popen[bytes]]) -> None:
    queue = JobQueue(connect(settings.redis_url), settings)
    first = spawn(settings)
    job = submit(client, slides_dir, BUSY)
    job_id = job["job_id"]
    wait_for("a few chunks done", lambda: job_state(client, job_id)["tiles_done"] >= 8)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = job_state(client, job_id)
    assert killed_at["state"] == constants.STATE_RUNNING and killed_at["tiles_done"] < killed_at["tiles_total"]
    spawn(settings)
    done = wait_for("the job to finish after the kill",
                    lambda: (s := job_state(client, job_id))["state"] in constants.TERMINAL_STATES and s)
    assert done["state"] == constants.STATE_DONE, done
    assert len(done["workers"]) == 2 and sum(done["workers"].values()) == done["chunks_total"]
    assert queue.depth() == (0, 0)  # the dead worker's message was reclaimed, redone and acknowledged
    # the undisturbed run: same slide, model and options, in its own storage and Redis namespace
    reference = make_settings(tmp_path / "reference", redis_url, shell_models_dir)
    with TestClient(create_app(reference)) as ref_client:
        ref_job = submit(ref_client, slides_dir, BUSY)
        assert ref_job["job_id"] == job_id  # content-addressed: the same job
        Worker(reference).run(burst=True)
        assert job_state(ref_client, job_id)["state"] == constants.STATE_DONE
        ref_result = ref_client.get(f"/v1/jobs/{job_id}/result").json()
    np.testing.assert_array_equal(heatmap(settings, job_id), heatmap(reference, job_id))
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["classification"] == ref_result["classification"]
    assert result["evidence"] == ref_result["evidence"]


def test_cancel_stops_compute(client: TestClient, settings: Settings, slides_dir: Path,
                              spawn: Callable[[Settings], subprocess.Popen[bytes]]) -> None:
    queue = JobQueue(connect(settings.redis_url), settings)
    spawn(settings)
    job = submit(client, slides_dir, BUSY)
    job_id = job["job_id"]
    wait_for("the first chunk", lambda: job_state(client, job_id)["tiles_done"] >= 2)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == constants.STATE_CANCELLED
    # the worker drops the rest of the job: every message acknowledged, no inference after that
    wait_for("the queue to drain", lambda: queue.depth() == (0, 0), timeout_s=30)
    tiles_before = int(queue.stats().get("tiles", 0))
    time.sleep(1.0)
    assert int(queue.stats().get("tiles", 0)) == tiles_before
    after = job_state(client, job_id)
    assert after["state"] == constants.STATE_CANCELLED and after["tiles_done"] < after["tiles_total"]
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # cancelling twice is harmless
    events = client.get(f"/v1/jobs/{job_id}/events").text
    assert 'event: end\ndata: {"state": "cancelled"}' in events
    metrics = client.get("/metrics").text
    assert 'pixelcam_jobs{state="cancelled"} 1.0' in metrics
    # a cancelled job can be submitted again: a new run of the same job id
    again = client.post("/v1/jobs", json={"slide_id": job["slide_id"], "options": BUSY})
    assert again.status_code == 202 and again.json()["job_id"] == job_id and again.json()["state"] == "queued"
    client.post(f"/v1/jobs/{job_id}/cancel")


def test_one_shot_upload_and_analyze(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    data = (slides_dir / SLIDE).read_bytes()
    params = {"filename": SLIDE, "options": json.dumps({"write_detections": False})}
    first = client.post("/v1/analyze", content=data, params=params)
    assert first.status_code == 202, first.text
    again = client.post("/v1/analyze", content=data, params=params)
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    bad = client.post("/v1/analyze", content=data, params={"filename": SLIDE, "options": "[1]"})
    assert bad.status_code == 422
    Worker(settings).run(burst=True)
    assert job_state(client, first.json()["job_id"])["state"] == constants.STATE_DONE


def test_a_permanent_error_fails_the_job_with_its_reason(client: TestClient, settings: Settings,
                                                         slides_dir: Path) -> None:
    job = submit(client, slides_dir)
    (settings.models_dir / "random.onnx").unlink()  # the model disappears before a worker gets the job
    Worker(settings).run(burst=True)
    failed = job_state(client, job["job_id"])
    assert failed["state"] == constants.STATE_FAILED and "no model 'random'" in failed["error"]
    assert client.get(f"/v1/jobs/{job['job_id']}/result").status_code == 409


def test_transient_errors_are_retried_a_bounded_number_of_times(client: TestClient, settings: Settings,
                                                                slides_dir: Path) -> None:
    job = submit(client, slides_dir)
    settings.jobs_dir.mkdir(parents=True)
    (settings.jobs_dir / job["job_id"]).write_text("a file where the job folder must go")
    worker = Worker(settings)
    deadline = time.monotonic() + 60
    while job_state(client, job["job_id"])["state"] not in constants.TERMINAL_STATES:
        assert time.monotonic() < deadline
        worker.run(burst=True)  # picks the message up again once it has been idle for claim_idle_s
        time.sleep(0.2)
    failed = job_state(client, job["job_id"])
    assert failed["state"] == constants.STATE_FAILED
    assert f"failed {settings.max_attempts} times" in failed["error"] and "FileExistsError" in failed["error"]


def test_jobs_survive_a_redis_restart(tmp_path: Path, shell_models_dir: Path, slides_dir: Path,
                                      spawn: Callable[[Settings], subprocess.Popen[bytes]]) -> None:
    server = PrivateRedis(tmp_path / "redis-aof", persist=True)  # AOF on, as in compose
    url = server.start()
    try:
        settings = make_settings(tmp_path, url, shell_models_dir)
        spawn(settings)
        with TestClient(create_app(settings)) as client:
            job = submit(client, slides_dir, BUSY)
            wait_for("some progress", lambda: job_state(client, job["job_id"])["tiles_done"] >= 4)
            server.stop()  # workers lose Redis in the middle of the job
            time.sleep(1.0)
            server.start()  # same port, same append-only file
            done = wait_for("the job to finish after the restart",
                            lambda: (s := job_state(client, job["job_id"]))["state"] in constants.TERMINAL_STATES and s)
            assert done["state"] == constants.STATE_DONE, done
            assert done["tiles_done"] == done["tiles_total"]
    finally:
        server.stop()


def test_workers_may_mount_the_storage_elsewhere(client: TestClient, settings: Settings, tmp_path: Path,
                                                 slides_dir: Path) -> None:
    job = submit(client, slides_dir, {"write_detections": False})
    planner = Worker(settings)
    msg = planner.queue.read(planner.name, 100)
    assert msg is not None and msg.kind == constants.MSG_PLAN
    planner.handle(msg)  # the plan is made where the storage is settings.storage_dir ...
    planner.close()
    moved = tmp_path / "another-mount"
    os.rename(settings.storage_dir, moved)  # ... and the rest runs where the same storage is mounted elsewhere
    elsewhere = settings.model_copy(update={"storage_dir": moved})
    Worker(elsewhere).run(burst=True)
    done = job_state(client, job["job_id"])
    assert done["state"] == constants.STATE_DONE, done
    assert (moved / "jobs" / job["job_id"] / "overlay.png").is_file()



def test_reader_processes_give_the_same_heatmap_and_few_open_pools(client: TestClient, settings: Settings,
                                                                  slides_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from service.slide.tile_reader import TileReader

    threads = submit(client, slides_dir, {"write_detections": False})
    Worker(settings).run(burst=True)
    procs = submit(client, slides_dir, {"write_detections": False, "threshold": 0.5})  # another job, same tiles
    assert procs["job_id"] != threads["job_id"]
    worker = Worker(settings.model_copy(update={"reader_processes": 1}))
    try:
        worker.run(burst=True)
        assert job_state(client, procs["job_id"])["state"] == constants.STATE_DONE
        assert np.array_equal(heatmap(settings, procs["job_id"]), heatmap(settings, threads["job_id"]))
        # runs of several jobs at once: a worker keeps at most two readers with worker processes open
        closed: list[TileReader] = []
        close = TileReader.close
        monkeypatch.setattr(TileReader, "close", lambda self: (closed.append(self), close(self))[1])
        job = worker.queue.get(procs["job_id"])
        plan = worker.plan_of(procs["job_id"], job["generation"], job)
        opened = [worker.reader_for(Message("m", constants.MSG_CHUNK, procs["job_id"], g), job, plan)[1]
                  for g in ("90", "91", "92")]
        assert all(r.processes == 1 for r in opened)
        assert worker.open_readers == 2 and closed == [opened[0]]
    finally:
        worker.close()


def test_metrics_count_job_outcomes_and_time_runs_and_queue_waits(client: TestClient, settings: Settings,
                                                                  slides_dir: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    assert before[("pixelcam_job_runs_total", (("outcome", "done"),))] == 0
    done = submit(client, slides_dir)
    time.sleep(0.3)  # a measurable queue wait
    Worker(settings).run(burst=True)
    assert job_state(client, done["job_id"])["state"] == constants.STATE_DONE
    cancelled = submit(client, slides_dir, {"min_tissue": 0.5})
    client.post(f"/v1/jobs/{cancelled['job_id']}/cancel")
    after = scrape()
    runs = {o: after[("pixelcam_job_runs_total", (("outcome", o),))] for o in ("done", "cancelled", "failed")}
    assert runs == {"done": 1, "cancelled": 1, "failed": 0}
    assert after[("pixelcam_job_seconds_count", (("outcome", "done"),))] == 1
    record = client.get(f"/v1/jobs/{done['job_id']}").json()
    took = after[("pixelcam_job_seconds_sum", (("outcome", "done"),))]
    assert 0.3 <= took <= 600 and took == pytest.approx(record["finished_at"] - record["created_at"], abs=0.01)
    assert after[("pixelcam_queue_wait_seconds_count", ())] == 1  # the cancelled job never started
    assert 0.3 <= after[("pixelcam_queue_wait_seconds_sum", ())] < took
    inf = after[("pixelcam_job_seconds_bucket", (("le", "+Inf"), ("outcome", "done")))]
    one_s = after[("pixelcam_job_seconds_bucket", (("le", "1.0"), ("outcome", "done")))]
    assert inf == 1 and one_s <= inf  # cumulative buckets


def test_a_small_job_submitted_behind_a_huge_one_finishes_first(client: TestClient, settings: Settings,
                                                                slides_dir: Path) -> None:
    huge = submit(client, slides_dir, {"inference": "tiles", "overlap": 0.75})  # ~300 tiles, ~80 chunks
    small = submit(client, slides_dir, {"inference": "tiles"})  # 20 tiles, 5 chunks, queued after it
    Worker(settings).run(burst=True)  # one worker, taking messages in queue order
    h, s = job_state(client, huge["job_id"]), job_state(client, small["job_id"])
    assert h["state"] == s["state"] == constants.STATE_DONE
    assert h["chunks_total"] > 10 * s["chunks_total"] > 0
    # before: the small job's chunks sat behind every chunk of the huge one and it ended last
    assert s["finished_at"] < h["finished_at"]
    huge_time = h["finished_at"] - h["started_at"]
    assert s["finished_at"] - s["created_at"] < 0.5 * huge_time, (s, h)
