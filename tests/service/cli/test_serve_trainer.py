"""`pixelcam serve` starts one trainer when torch is importable (PIXELCAM_TRAINERS / --trainers turn it off or up),
and a training job submitted to it runs to a registered model; `pixelcam trainer` refuses to run without Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli.serve import torch_available, trainer_count
from service.jobs.redis_server import free_port
from service.settings import Settings
from tests.service.api.test_api_serve import _children, _start, _stop
from tests.service.shell import REPO_ROOT

pytestmark = pytest.mark.redis


def _cmdlines(pids: list[int]) -> list[str]:
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids]


def test_trainer_count_follows_the_setting_and_torch() -> None:
    assert torch_available()  # the dev install has the train extra
    assert trainer_count(Settings(trainers=-1)) == 1
    assert trainer_count(Settings(trainers=0)) == 0
    assert trainer_count(Settings(trainers=3)) == 3


def test_pixelcam_trainer_needs_the_redis_of_the_api() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELCAM_")}
    done = subprocess.run([sys.executable, "-m", "service.cli.main", "trainer"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "PIXELCAM_REDIS_URL" in done.stderr


def test_serve_starts_a_trainer_that_runs_a_training_job(tmp_path: Path, shell_models_dir: Path,
                                                         mosaic_slides: list[dict[str, Any]]) -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find the child processes")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, shell_models_dir, port)
    try:
        commands = _cmdlines(_children(proc.pid))
        assert sum("service.jobs.trainer" in c for c in commands) == 1, commands
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz").json()["checks"]["trainers"] != "1 alive":
            assert time.monotonic() < deadline, "the trainer never said it was alive"
            time.sleep(0.3)
        slides = []
        for m in mosaic_slides:
            resp = httpx.post(f"{base}/v1/slides", params={"filename": m["path"].name},
                              content=m["path"].read_bytes(), timeout=60)
            slides.append({"slide_id": resp.json()["slide_id"], "label": m["label"]})
        job = httpx.post(f"{base}/v1/training-jobs", json={"slides": slides, "config": {"quick": True, "threads": 1},
                                                           "name": "served"}, timeout=60).json()
        deadline = time.monotonic() + 300
        while (state := httpx.get(f"{base}/v1/training-jobs/{job['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["state"] == "done" and state["model"] == "served", state
        assert "served" in [m["name"] for m in httpx.get(f"{base}/v1/models").json()["models"]]
    finally:
        leftovers = _stop(proc)
    assert leftovers == [], "a trainer or redis process survived `pixelcam serve`"
    # and with PIXELCAM_TRAINERS=0 it starts none
    proc = _start(tmp_path, shell_models_dir, port, PIXELCAM_TRAINERS="0")
    try:
        assert not any("service.jobs.trainer" in c for c in _cmdlines(_children(proc.pid)))
    finally:
        assert _stop(proc) == []
