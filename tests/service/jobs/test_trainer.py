"""The trainer with the real recipe on real mosaics: a run that fails says why (from the recipe's own log), a slide
gone from the storage fails before the recipe starts, a stopped trainer fails its job; none leaves a model."""

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

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.jobs.queue import connect
from service.jobs.trainer import Trainer, evaluation_summary, explain_rows, last_error, read_progress
from service.jobs.training_queue import TrainingQueue
from service.settings import Settings
from tests.service.shell import REPO_ROOT, make_settings, process_alive

pytestmark = pytest.mark.redis

TRACEBACK_LOG = """\
2026-12-04 04:12:40,100 INFO training.run: === stage baseline ===
2026-12-04 04:12:40,200 ERROR training.stages: extraction of slide 2 failed
Traceback (most recent call last):
  File "/x/training/run.py", line 10, in main
    raise ConfigError("manifest row 3: slide not found")
training.config.ConfigError: manifest row 3: slide not found
"""


def test_last_error_takes_the_exception_of_the_last_traceback_then_the_last_error_record() -> None:
    assert last_error(TRACEBACK_LOG, 1) == ("the training run failed (exit code 1): training.config.ConfigError: "
                                            "manifest row 3: slide not found")
    logged = "2026-12-04 04:12:40,100 INFO a: fine\n2026-12-04 04:12:41,000 ERROR training.run: out of tiles\nbye\n"
    assert last_error(logged, 2) == "the training run failed (exit code 2): out of tiles"
    assert last_error("", -signal.SIGKILL) == "the training run was killed by SIGKILL (out of memory?)"
    assert last_error("just this\n", 3) == "the training run failed (exit code 3): just this"
    assert explain_rows("DatasetError: manifest row 2: cannot read slide.tif; manifest.csv row 9: x", ["a", "b"]) == (
        "DatasetError: slides[1] (slide b): cannot read slide.tif; manifest.csv row 9: x")


def test_the_evaluation_shown_with_a_model_leaves_out_the_trainer_machine_paths() -> None:
    report = {"slide_path": {"accuracy": 75.0, "pxap": 61.5, "n": 4, "options": {"batch_size": 16}},
              "results": {"pixelcam": {"checkpoint": "/srv/x/best.pt", "test": {"pxap": 50.0}}},
              "eval_split": "test", "n_test": 4, "wall_s": 3}
    assert evaluation_summary(report, "abc") == {
        "training_job": "abc", "slide_path": {"accuracy": 75.0, "pxap": 61.5, "n": 4},
        "results": {"pixelcam": {"test": {"pxap": 50.0}}}, "eval_split": "test", "n_test": 4}
    assert evaluation_summary(None, "abc") == {"training_job": "abc"}


def test_read_progress_is_none_until_the_recipe_wrote_it(tmp_path: Path) -> None:
    assert read_progress(tmp_path / "progress.json") is None
    (tmp_path / "progress.json").write_text('{"stage": "cams", "progress": 0.4}')
    assert read_progress(tmp_path / "progress.json") == {"stage": "cams", "progress": 0.4}
    (tmp_path / "progress.json").write_text("[1, 2]")
    assert read_progress(tmp_path / "progress.json") is None


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Settings:
    return make_settings(tmp_path, redis_url, shell_models_dir, trainer_lease_s=2.0)


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _submit(client: TestClient, mosaic_slides: list[dict[str, Any]], config: dict[str, Any]) -> tuple[str, list[str]]:
    ids = []
    for m in mosaic_slides:
        resp = client.post("/v1/slides", content=m["path"].read_bytes(), params={"filename": m["path"].name})
        assert resp.status_code in (200, 201), resp.text
        ids.append(resp.json()["slide_id"])
    slides = [{"slide_id": i, "label": m["label"], "annotations": m["annotations"]}
              for i, m in zip(ids, mosaic_slides, strict=True)]
    resp = client.post("/v1/training-jobs", json={"slides": slides, "config": config})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"], ids


def _models(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.iterdir())


def test_a_slide_damaged_on_the_storage_fails_the_run_with_the_recipes_reason(
        client: TestClient, settings: Settings, mosaic_slides: list[dict[str, Any]]) -> None:
    before = _models(settings)
    training_id, slide_ids = _submit(client, mosaic_slides, {"quick": True, "threads": 1})
    damaged = next((settings.slides_dir / slide_ids[1]).glob("slide*"))
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # the bytes went bad after the upload
    assert Trainer(settings).run(burst=True) == 1
    job = client.get(f"/v1/training-jobs/{training_id}").json()
    assert job["state"] == "failed" and job["model"] is None, job
    # the recipe's own words (its last exception), its manifest row named as the request's slide
    assert job["error"].startswith("the training run failed (exit code 1): "), job["error"]
    assert f"slides[1] (slide {slide_ids[1]}): cannot read slide" in job["error"], job["error"]
    assert str(settings.storage_dir) not in job["error"], "the error shows the server's storage path"
    assert _models(settings) == before


def test_a_slide_deleted_after_submit_fails_the_job_before_the_recipe_starts(
        client: TestClient, settings: Settings, mosaic_slides: list[dict[str, Any]]) -> None:
    training_id, slide_ids = _submit(client, mosaic_slides, {"quick": True, "threads": 1})
    client_redis = connect(settings.redis_url)
    try:  # the API refuses to delete it while the job is unfinished; the storage can still lose it
        for child in (settings.slides_dir / slide_ids[0]).iterdir():
            child.unlink()
        (settings.slides_dir / slide_ids[0]).rmdir()
        assert Trainer(settings, client=client_redis).run(burst=True) == 1
    finally:
        client_redis.close()
    job = client.get(f"/v1/training-jobs/{training_id}").json()
    assert job["state"] == "failed" and "slides[0]" in job["error"] and "gone from the storage" in job["error"]
    assert not (settings.training_dir / training_id / "run").exists()


def test_sigterm_to_a_trainer_stops_the_recipe_and_fails_its_job_with_the_reason(
        client: TestClient, settings: Settings, mosaic_slides: list[dict[str, Any]], tmp_path: Path) -> None:
    before = _models(settings)
    training_id, _ = _submit(client, mosaic_slides, {"quick": True, "threads": 1, "epochs": 300})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELCAM_")}
    env.update(settings.to_env())
    with (tmp_path / "trainer.log").open("ab") as log:
        trainer = subprocess.Popen([sys.executable, "-m", "service.cli.main", "trainer"], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    redis_client = connect(settings.redis_url)
    try:
        tq = TrainingQueue(redis_client, settings)
        deadline = time.monotonic() + 120
        while (job := tq.get(training_id)).get("stage") != "baseline" or not job.get("epoch"):
            assert time.monotonic() < deadline and trainer.poll() is None, (tmp_path / "trainer.log").read_text()
            time.sleep(0.1)
        pid = int(job["pid"])
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(60) == 0
        assert not process_alive(pid)
        job = tq.get(training_id)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        redis_client.close()
    assert job["state"] == "failed" and "trainer was stopped (SIGTERM)" in job["error"]
    assert _models(settings) == before
    progress = json.loads((settings.training_dir / training_id / "run" / "progress.json").read_text())
    assert progress["stage"] == "baseline"  # it had really been training
