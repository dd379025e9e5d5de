"""The deployment files: compose parses and wires redis/api/worker on shared storage; images install our extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_compose_services_share_storage_and_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker", "worker-gpu"} <= set(services)
    for name in ("redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["PIXELCAM_REDIS_URL"].startswith("redis://redis:"), name
        assert f"storage:{env['PIXELCAM_STORAGE_DIR']}" in services[name]["volumes"], name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert {"storage", "redis-data"} <= set(compose["volumes"])
    # `--scale worker=N` needs a worker without fixed ports or container names
    assert "ports" not in services["worker"] and "container_name" not in services["worker"]
    assert services["worker"]["command"][:2] == ["pixelcam", "worker"]
    assert services["api"]["command"][:2] == ["pixelcam", "serve"]
    # published on loopback unless the operator says otherwise (an open API must not face the network by default)
    assert services["api"]["ports"] == ["${PIXELCAM_PUBLISH_ADDR:-127.0.0.1}:8000:8000"]
    assert "readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def _pip_installs(dockerfile: str) -> list[str]:
    text = (REPO / "docker" / dockerfile).read_text()
    return re.findall(r'pip install "\.\[([a-z,]+)\]"', text)


def test_images_install_the_intended_extras(extras: dict[str, list[str]]) -> None:
    assert _pip_installs("Dockerfile") == ["cpu"]
    assert _pip_installs("Dockerfile.gpu") == ["gpu"]
    assert _pip_installs("Dockerfile.train") == ["train"]
    assert not any(dep.startswith("torch") for dep in extras["cpu"] + extras["gpu"])
    assert any(dep.startswith("onnxruntime-gpu") for dep in extras["gpu"])
    assert any(re.fullmatch(r"torch==[0-9.]+", dep) for dep in extras["train"])  # pinned, never bare
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(dep.startswith(("torch", "onnxruntime")) for dep in base)


def test_images_copy_every_package_the_install_needs() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu", "Dockerfile.train"):
        text = (REPO / "docker" / name).read_text()
        for src in ("pyproject.toml", "model", "service", "training"):
            assert re.search(rf"^COPY {re.escape(src)}\b", text, flags=re.M), (name, src)


def test_api_image_puts_the_viewer_assets_where_the_installed_viewer_looks() -> None:
    from service.api.routes import viewer

    text = (REPO / "docker" / "Dockerfile").read_text()
    site = "/usr/local/lib/python3.11/site-packages"  # python:3.11-slim's purelib
    relative = viewer.osd_dir().relative_to(Path(viewer.__file__).resolve().parents[3])
    assert re.search(rf"^\s*{re.escape(f'{site}/{relative.as_posix()}')}\s*$", text, flags=re.M)
    assert "FROM python:3.11-slim" in text and "npm ci" in text
    swagger = viewer.swagger_dir().relative_to(Path(viewer.__file__).resolve().parents[3])
    assert re.search(rf"^\s*{re.escape(f'{site}/{swagger.as_posix()}')}\s*$", text, flags=re.M)


def test_the_trainer_service_runs_pixelcam_trainer_on_the_shared_storage_from_the_torch_image(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    trainer = services["trainer"]
    assert trainer["command"] == ["pixelcam", "trainer"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.train"
    env = trainer["environment"]
    assert env["PIXELCAM_REDIS_URL"] == services["api"]["environment"]["PIXELCAM_REDIS_URL"]
    assert f"storage:{env['PIXELCAM_STORAGE_DIR']}" in trainer["volumes"]  # the API's slides and models folder
    assert env["PIXELCAM_STORAGE_DIR"] == services["api"]["environment"]["PIXELCAM_STORAGE_DIR"]
    assert trainer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert trainer["healthcheck"]["test"] and "ports" not in trainer and "container_name" not in trainer
    # the API container never trains (its image has no torch, and it says so)
    assert services["api"]["command"][services["api"]["command"].index("--trainers") + 1] == "0"
    text = (REPO / "docker" / "Dockerfile.train").read_text()
    assert re.search(r'^CMD \["pixelcam", "trainer"\]$', text, flags=re.M)
    assert "uid 1000" in text and "uid 1000" in (REPO / "docker" / "Dockerfile").read_text()  # one owner of /data
