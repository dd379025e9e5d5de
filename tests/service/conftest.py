"""Service fixtures: a small random model exported through the real contract, the real test slides, and a real
Redis: `PIXELCAM_TEST_REDIS_URL`, else a private Valkey per session. Every test that asks for `settings` or
`queue` gets its own key prefix and storage folder, so tests never see each other's jobs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.jobs.queue import JobQueue, connect
from service.jobs.redis_server import PrivateRedis
from service.settings import Settings
from tests.service.shell import make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def random_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised resnet18 (width 0.25, output stride 8, 1.0 um/px) written by `model.export`."""
    out = tmp_path_factory.mktemp("model") / "pixelcam-random-resnet18.onnx"
    cmd = [
        sys.executable, "-m", "model.export", "--random", str(out), "--encoder", "resnet18",
        "--width", "0.25", "--output-stride", "8", "--input-mpp", "1.0", "--parity-tiles", "0",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not out.is_file():
        pytest.fail(f"`{' '.join(cmd[1:])}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out


@pytest.fixture(scope="session")
def random_predictor(random_model_path: Path) -> Any:  # model.runtime.Predictor
    """One long-lived predictor on the random model (2 threads: the test machines are small)."""
    from model.runtime import Predictor

    return Predictor(random_model_path, threads=2)


@pytest.fixture(scope="session")
def cmu_small_path(slides_dir: Path) -> Path:
    """The real Aperio crop CMU-1-Small-Region.svs (2220 x 2967, 0.499 um/px)."""
    path = slides_dir / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.fail(f"{path} is missing from the shared data; see MANIFEST.md")
    return path


@pytest.fixture(scope="session")
def missing_mpp_slide_path(slides_dir: Path) -> Path:
    """A real TIFF without any resolution metadata (kidney-48-5.tif)."""
    return slides_dir / "kidney-48-5.tif"


@pytest.fixture(scope="session")
def refused_slide_path(slides_dir: Path) -> Path:
    """A real fluorescence QPTIFF that the brightfield pipeline refuses."""
    return slides_dir / "small_vectra.qptiff"


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


@pytest.fixture(scope="session")
def mosaic_slides(tmp_path_factory: pytest.TempPathFactory, glas_dir: Path) -> list[dict[str, Any]]:
    """Four real-tissue mosaic slides (2 benign, 2 malignant; two GlaS training images each, tiled TIFF at
    0.62005 um/px) with their QuPath gland GeoJSON, written by `training.mosaics`: path, label, annotations."""
    # the training side (torch) is imported only by the tests that train
    from training.mosaics import write_mosaics

    out = tmp_path_factory.mktemp("mosaics")
    manifest = write_mosaics(glas_dir, out, images_per_slide=2, max_slides=2)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["label"] for r in rows) == ["benign", "benign", "malignant", "malignant"]
    return [{"path": out / r["slide"], "label": r["label"],
             "annotations": json.loads((out / r["annotations"]).read_text())} for r in rows]
