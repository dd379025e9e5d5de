"""Shared fixtures: where the real data lives (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`PIXELCAM_DATA_DIR`, else the `shared/data` folder beside the repository."""
    env = os.environ.get("PIXELCAM_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set PIXELCAM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def slides_dir(data_dir: Path) -> Path:
    return data_dir / "slides"


@pytest.fixture(scope="session")
def glas_dir(data_dir: Path) -> Path:
    return data_dir / "glas"
