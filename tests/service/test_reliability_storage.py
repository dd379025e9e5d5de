"""Storage faults beyond a full disk: a job folder that vanishes mid-job, storage that cannot be written."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import constants
from service.api.app import create_app
from service.jobs import worker as worker_module
from service.jobs.worker import Worker
from service.settings import Settings

SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _run_until_ended(client: TestClient, settings: Settings, job_id: str) -> dict[str, Any]:
    """Work the queue (retries come back after the claim timeout) until the job ends; bounded, never a hang."""
    worker = Worker(settings)
    for _ in range(2 * settings.max_attempts + 2):
        worker.run(burst=True)
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in constants.TERMINAL_STATES:
            return job
        time.sleep(settings.claim_idle_s + 0.2)
    raise AssertionError(f"job {job_id} did not end: {job}")


def _submit(client: TestClient, slides_dir: Path, **options: Any) -> str:
    slide = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
    assert slide.status_code in (200, 201), slide.text
    job = client.post("/v1/jobs", json={"slide_id": slide.json()["slide_id"], "options": options})
    assert job.status_code == 202, job.text
    return str(job.json()["job_id"])


def test_a_job_folder_that_vanishes_mid_job_fails_the_job_with_a_reason(
    client: TestClient, settings: Settings, slides_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _submit(client, slides_dir, inference="tiles")
    real_save = worker_module.save_chunk
    saved = []

    def save_then_lose_the_folder(job_dir: Path, chunk_id: int, out: Any) -> Path:
        path = real_save(job_dir, chunk_id, out)
        saved.append(chunk_id)
        if len(saved) == 2:  # storage lost under the job (an unmounted share, a cleaner): plan and chunks gone
            shutil.rmtree(job_dir)
        return path

    monkeypatch.setattr(worker_module, "save_chunk", save_then_lose_the_folder)
    job = _run_until_ended(client, settings, job_id)
    assert job["state"] == constants.STATE_FAILED, job
    assert "finalize failed" in job["error"] and "no chunk output" in job["error"], job["error"]
    assert str(settings.storage_dir) not in job["error"]  # says what happened, not where the server keeps files
    assert client.get(f"/v1/jobs/{job_id}/result").status_code in (404, 409, 410)
    assert not (settings.jobs_dir / job_id / "result.json").exists()  # no half-written result


def test_storage_that_cannot_be_written_fails_the_job_with_a_reason(
    client: TestClient, settings: Settings, slides_dir: Path
) -> None:
    job_id = _submit(client, slides_dir)
    (settings.jobs_dir / job_id).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(settings.jobs_dir / job_id)
    (settings.jobs_dir / job_id).write_bytes(b"")  # a file where the job's folder must go: every write fails
    job = _run_until_ended(client, settings, job_id)
    assert job["state"] == constants.STATE_FAILED, job
    assert job["error"].startswith("plan failed") and "check that it is mounted and writable" in job["error"]
    assert str(settings.storage_dir) not in job["error"] and "<job storage>" in job["error"], job["error"]
