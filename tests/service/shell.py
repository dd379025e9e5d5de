"""Helpers of the service-shell tests: isolated settings on a real Redis, the app on a real uvicorn."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from service.api import create_app
from service.jobs.redis_server import free_port
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "live_app", "make_settings"]


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (reaped or not, a zombie has stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def make_settings(tmp_path: Path, redis_url: str, models_dir: Path | None = None, **overrides: object) -> Settings:
    """Settings isolated to one test: own key prefix, own storage; short timings so tests take seconds."""
    values: dict[str, object] = dict(
        redis_url=redis_url, redis_prefix=f"test-{uuid.uuid4().hex[:12]}", storage_dir=tmp_path / "storage",
        chunk_size=4, batch_size=2, threads=1, claim_idle_s=1.5, heartbeat_s=0.3, block_ms=100, max_attempts=3,
    )
    if models_dir is not None:
        values["models_dir_override"] = models_dir
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def live_app(settings: Settings) -> Iterator[int]:
    """The app on a real uvicorn in a thread, on a free loopback port (yielded); stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
