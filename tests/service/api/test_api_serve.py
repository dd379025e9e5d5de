"""`pixelcam serve` with no Redis configured: embedded Valkey, API and a local worker; a clean stop; state persists."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.jobs.redis_server import free_port
from tests.service.shell import REPO_ROOT, process_alive

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _start(tmp_path: Path, models_dir: Path, port: int, **extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELCAM_")}
    env.update(extra)
    env.update(PIXELCAM_STORAGE_DIR=str(tmp_path / "var"), PIXELCAM_MODELS_DIR=str(models_dir),
               PIXELCAM_PORT=str(port), PIXELCAM_WORKERS="1", PIXELCAM_CHUNK_SIZE="8", PIXELCAM_THREADS="1",
               PIXELCAM_BLOCK_MS="200")
    log = (tmp_path / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", "serve"], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("pixelcam serve did not become ready: " + (tmp_path / "serve.log").read_text()[-3000:])


def _stop(proc: subprocess.Popen[bytes]) -> list[int]:
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in children if process_alive(pid)]


def test_serve_runs_a_job_on_the_embedded_redis_and_stops_cleanly(tmp_path: Path, shell_models_dir: Path,
                                                                  slides_dir: Path) -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find the child processes")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, shell_models_dir, port)
    try:
        assert len(_children(proc.pid)) >= 2  # the embedded Valkey and one worker
        slide = httpx.post(f"{base}/v1/slides", params={"filename": SLIDE},
                           content=(slides_dir / SLIDE).read_bytes(), timeout=60).json()
        job = httpx.post(f"{base}/v1/jobs", json={"slide_id": slide["slide_id"],
                                                  "options": {"write_detections": False}}, timeout=30).json()
        deadline = time.monotonic() + 120
        while (state := httpx.get(f"{base}/v1/jobs/{job['job_id']}").json())["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert state["state"] == "done", state
    finally:
        leftovers = _stop(proc)
    assert leftovers == [], "worker or redis processes survived `pixelcam serve`"
    assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir()  # AOF persistence in the storage dir
    # a restart finds the finished job again
    proc = _start(tmp_path, shell_models_dir, port)
    try:
        again = httpx.get(f"{base}/v1/jobs/{job['job_id']}").json()
        assert again["state"] == "done" and again["tiles_done"] == state["tiles_done"]
        assert httpx.get(f"{base}/v1/jobs/{job['job_id']}/result").status_code == 200
    finally:
        assert _stop(proc) == []


def test_sigterm_stops_serve_within_the_grace_period_despite_a_stuck_upload(tmp_path: Path,
                                                                            shell_models_dir: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, shell_models_dir, port, PIXELCAM_SHUTDOWN_GRACE_S="2", PIXELCAM_WORKERS="0",
                  PIXELCAM_UPLOAD_IDLE_TIMEOUT_S="300")
    stuck = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        # an upload that announced 50 MB, sent 1 kB and then nothing: graceful shutdown would wait for it
        stuck.sendall(b"POST /v1/slides?filename=s.svs HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/octet-stream\r\nContent-Length: 50000000\r\n\r\n" + b"\0" * 1024)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        stuck.close()
        proc.kill()
        proc.wait(10)
    assert code == 0
    assert took < 2 + 8, f"stopping took {took:.1f} s with a 2 s grace period"
    assert list((tmp_path / "var" / "slides").glob(".upload-*")) == [], "the abandoned upload left its partial file"
