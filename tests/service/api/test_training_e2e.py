"""Training jobs end to end on a real Redis, a real uvicorn, a real trainer process and the real recipe (quick
config) on real-tissue mosaic slides: a REST round trip to a registered model that analyses a slide; a cancel and a
SIGKILLed trainer mid-run, each with the job's state and the models directory checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.jobs.queue import connect
from service.jobs.training_queue import TrainingQueue
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.shell import REPO_ROOT, live_app, make_settings, process_alive

pytestmark = pytest.mark.redis

QUICK = {"quick": True, "threads": 1}
LONG = {"quick": True, "threads": 1, "epochs": 300}  # a baseline long enough to stop in the middle


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Settings:
    return make_settings(tmp_path, redis_url, shell_models_dir, trainer_lease_s=2.0)


@pytest.fixture()
def api(settings: Settings) -> Iterator[str]:
    with live_app(settings) as port:
        yield f"http://127.0.0.1:{port}"


class Trainers:
    """`python -m service.jobs.trainer` processes on the test's settings; all killed at the end."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELCAM_")}
        env.update(self.settings.to_env())
        with self.log.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.jobs.trainer"], cwd=REPO_ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture()
def trainers(settings: Settings, tmp_path: Path) -> Iterator[Trainers]:
    pool = Trainers(settings, tmp_path / "trainer.log")
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture()
def slides(api: str, mosaic_slides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in mosaic_slides:
        resp = httpx.post(f"{api}/v1/slides", params={"filename": m["path"].name}, content=m["path"].read_bytes(),
                          timeout=60)
        assert resp.status_code == 201, resp.text
        out.append({"slide_id": resp.json()["slide_id"], "label": m["label"], "annotations": m["annotations"]})
    return out


def follow(url: str, timeout_s: float) -> list[tuple[str, dict[str, Any]]]:
    """The server-sent events of a stream until its `end` event."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=timeout_s)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
                if kind == "end":
                    break
    return events


def wait_for(what: str, check: Any, timeout_s: float, trainer_log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    log = trainer_log.read_text()[-3000:] if trainer_log and trainer_log.is_file() else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def models_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.iterdir())


def record(settings: Settings, training_id: str) -> dict[str, str]:
    """The job's Redis hash, read directly (the API would check the lease on the way)."""
    client = connect(settings.redis_url)
    try:
        return TrainingQueue(client, settings).get(training_id)
    finally:
        client.close()


def submit(api: str, slides: list[dict[str, Any]], config: dict[str, Any], name: str) -> dict[str, Any]:
    resp = httpx.post(f"{api}/v1/training-jobs", json={"slides": slides, "config": config, "name": name}, timeout=60)
    assert resp.status_code == 202, resp.text
    return resp.json()  # type: ignore[no-any-return]


def in_baseline(api: str, training_id: str) -> dict[str, Any] | None:
    job = httpx.get(f"{api}/v1/training-jobs/{training_id}", timeout=10).json()
    assert job["state"] in ("queued", "running"), job
    return job if job["stage"] == "baseline" and (job["epoch"] or 0) >= 1 else None


def test_round_trip_train_on_uploaded_mosaics_then_analyse_with_the_registered_model(
        api: str, settings: Settings, slides: list[dict[str, Any]], trainers: Trainers, tmp_path: Path) -> None:
    before = models_files(settings)
    job = submit(api, slides, QUICK, "mosaic-quick")
    trainers.start()
    t0 = time.monotonic()
    events = follow(f"{api}/v1/training-jobs/{job['id']}/events", timeout_s=300)
    took = time.monotonic() - t0
    assert events[-1] == ("end", {"state": "done", "model": "mosaic-quick"}), (events[-3:], trainers.log.read_text()[-3000:])
    progress = [e for kind, e in events if kind == "progress"]
    assert [p["state"] for p in progress][0] == "queued" and progress[-1]["state"] == "done"
    # the stream looks twice a second, so a stage shorter than that (quick: cams, pixelcam) may pass unseen
    running = [p for p in progress if p["state"] == "running" and p["stage"]]
    order = running[0]["stages"]
    assert order[0] == "extract" and {"baseline", "pixelcam", "evaluate", "export"} <= set(order), order
    seen = [order.index(p["stage"]) for p in running]
    assert seen == sorted(seen) and len(set(seen)) >= 3, [p["stage"] for p in running]
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(p["metrics"] for p in progress), "no metrics were published while it ran"
    done = httpx.get(f"{api}/v1/training-jobs/{job['id']}").json()
    assert done["model"] == "mosaic-quick" and len(done["model_sha256"]) == 64 and done["error"] is None
    slide_path = done["evaluation"]["slide_path"]
    assert 0 <= slide_path["accuracy"] <= 100 and 0 <= slide_path["pxap"] <= 100 and slide_path["n"] >= 1
    assert "checkpoint" not in json.dumps(done["evaluation"]), "the evaluation shows the server's paths"
    print(f"quick training job: {took:.1f} s from submit to done; slide path {slide_path}")
    # registered: listed, valid, its evaluation shown, not the default
    listed = httpx.get(f"{api}/v1/models").json()
    assert listed["default"] == "random"
    entry = next(m for m in listed["models"] if m["name"] == "mosaic-quick")
    assert entry["valid"] and not entry["default"] and entry["sha256"] == done["model_sha256"]
    model = httpx.get(f"{api}/v1/models/mosaic-quick").json()
    assert model["evaluation"]["training_job"] == job["id"]
    assert model["evaluation"]["slide_path"]["pxap"] == slide_path["pxap"]
    assert model["metadata"]["provenance"]["metrics"], model["metadata"]["provenance"]
    assert models_files(settings) == sorted([*before, "DEFAULT", "mosaic-quick.evaluation.json", "mosaic-quick.onnx"])
    # usable at once for an analysis
    analysis = httpx.post(f"{api}/v1/jobs", json={"slide_id": slides[0]["slide_id"], "model": "mosaic-quick"})
    assert analysis.status_code == 202, analysis.text
    Worker(settings).run(burst=True)
    result = httpx.get(f"{api}/v1/jobs/{analysis.json()['job_id']}")
    assert result.json()["state"] == "done", result.text
    assert result.json()["model"] == "mosaic-quick" and result.json()["model_sha256"] == done["model_sha256"]
    assert httpx.get(f"{api}/v1/jobs/{analysis.json()['job_id']}/result").json()["classification"]["label"] in (
        "benign", "malignant")


def test_cancel_mid_run_stops_the_recipe_and_registers_nothing(
        api: str, settings: Settings, slides: list[dict[str, Any]], trainers: Trainers) -> None:
    before = models_files(settings)
    job = submit(api, slides, LONG, "never-registered")
    trainer = trainers.start()
    wait_for("the baseline stage", lambda: in_baseline(api, job["id"]), 120, trainers.log)
    pid = int(record(settings, job["id"])["pid"])
    assert process_alive(pid)
    cancelled = httpx.post(f"{api}/v1/training-jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    wait_for("the recipe to stop", lambda: not process_alive(pid), 30, trainers.log)
    events = follow(f"{api}/v1/training-jobs/{job['id']}/events", timeout_s=10)
    assert events[-1] == ("end", {"state": "cancelled", "model": None})
    final = httpx.get(f"{api}/v1/training-jobs/{job['id']}").json()
    assert final["state"] == "cancelled" and final["model"] is None
    assert models_files(settings) == before  # no new model, no temporary file
    assert trainer.poll() is None, "the trainer died with the job it stopped"
    # and it takes the next job
    nxt = submit(api, slides, LONG, "next-one")
    wait_for("the next job to start", lambda: in_baseline(api, nxt["id"]), 120, trainers.log)
    httpx.post(f"{api}/v1/training-jobs/{nxt['id']}/cancel")


def test_a_trainer_killed_mid_run_fails_its_job_with_the_reason_and_leaves_no_model(
        api: str, settings: Settings, slides: list[dict[str, Any]], trainers: Trainers) -> None:
    before = models_files(settings)
    job = submit(api, slides, LONG, "orphan")
    trainer = trainers.start()
    wait_for("the baseline stage", lambda: in_baseline(api, job["id"]), 120, trainers.log)
    pid = int(record(settings, job["id"])["pid"])
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    # the recipe dies with its trainer (no training goes on unseen)
    wait_for("the recipe to die with its trainer", lambda: not process_alive(pid), 15, trainers.log)
    # the next trainer finds the expired lease (read from Redis here: the API would check it on its own)
    trainers.start()
    failed = wait_for("the next trainer to fail the job",
                      lambda: (r := record(settings, job["id"]))["state"] == "failed" and r, 30, trainers.log)
    assert "stopped without finishing" in failed["error"] and "resubmit" in failed["error"]
    shown = httpx.get(f"{api}/v1/training-jobs/{job['id']}").json()
    assert shown["state"] == "failed" and shown["model"] is None and shown["error"] == failed["error"]
    assert models_files(settings) == before
    assert not list(settings.models_dir.glob(".training-*"))
