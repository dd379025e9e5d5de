"""Service fixtures: a small random model exported through the real contract, and the CMU test slide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
