"""Real-Redis fixtures for the service-shell tests: `PIXELCAM_TEST_REDIS_URL`, else a private Valkey per session.

Star-import them into a test module: `from tests.service.conftest_redis import *`.
Every test gets its own key prefix and storage folder, so tests never see each other's jobs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import uvicorn

from service.api import create_app
from service.queue import JobQueue, connect
from service.redis_server import PrivateRedis, free_port
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["redis_url", "redis_client", "shell_model_path", "shell_models_dir", "settings", "queue", "make_settings"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL: the one given in PIXELCAM_TEST_REDIS_URL, else a private server for this session."""
    given = os.environ.get("PIXELCAM_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = PrivateRedis(tmp_path_factory.mktemp("redis"), persist=False)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def shell_model_path(random_model_path: Path) -> Path:
    """The small random model of `tests/service/conftest.py` (exported once per session through the contract)."""
    return random_model_path


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


@pytest.fixture()
def shell_models_dir(tmp_path: Path, shell_model_path: Path) -> Path:
    """A models directory holding the random model (as `random.onnx`)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(shell_model_path, folder / "random.onnx")
    return folder


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Settings:
    """Settings for one test, with the random model as the only (default) model."""
    return make_settings(tmp_path, redis_url, shell_models_dir)


@pytest.fixture()
def queue(redis_client: redis.Redis, tmp_path: Path, redis_url: str) -> Iterator[JobQueue]:
    """A job queue under a fresh key prefix (no model needed)."""
    q = JobQueue(redis_client, make_settings(tmp_path, redis_url))
    q.ensure_group()
    yield q
    for key in redis_client.scan_iter(f"{q.settings.redis_prefix}:*"):
        redis_client.delete(key)
