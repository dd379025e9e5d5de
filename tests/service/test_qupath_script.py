"""The shipped QuPath script: Groovy syntax (Debian's groovy parser), and every file, route and parameter it names
exists in what pixelcam writes and serves. QuPath itself is not run here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.cli.analyze import SLIDE_HEATMAP
from tests.service.shell import make_settings

SCRIPT = Path(__file__).resolve().parents[2] / "service" / "static" / "qupath" / "pixelcam_import.groovy"
PARSE = """
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases
def unit = new CompilationUnit()
unit.addSource(new File(args[0]))
unit.compile(Phases.CONVERSION)
println 'syntax ok'
"""


def _java_home() -> str | None:
    java = shutil.which("java")
    return str(Path(os.path.realpath(java)).parents[1]) if java else None


def _groovy_parse(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    checker = tmp_path / "parse.groovy"
    checker.write_text(PARSE)
    env = dict(os.environ, JAVA_HOME=os.environ.get("JAVA_HOME") or _java_home() or "")
    return subprocess.run(["groovy", str(checker), str(path)], capture_output=True, text=True, timeout=120, env=env,
                          check=False)


@pytest.fixture()
def groovy() -> None:
    if shutil.which("groovy") is None or _java_home() is None:
        if os.environ.get("CI"):
            pytest.fail("groovy is not installed: .ci/run installs Debian's groovy for this test")
        pytest.skip("Debian's groovy is not installed (apt-get install groovy)")


@pytest.mark.usefixtures("groovy")
def test_the_script_parses_and_a_broken_one_does_not(tmp_path: Path) -> None:
    ok = _groovy_parse(SCRIPT, tmp_path)
    assert ok.returncode == 0 and "syntax ok" in ok.stdout, ok.stderr
    broken = tmp_path / "broken.groovy"
    broken.write_text(SCRIPT.read_text().replace("} else {", "} else {{", 1))
    bad = _groovy_parse(broken, tmp_path)
    assert bad.returncode != 0 and "error" in (bad.stderr + bad.stdout).lower()


def _setting(name: str) -> str:
    match = re.search(rf"String {name} = '([^']*)'", SCRIPT.read_text())
    assert match, name
    return match.group(1)


def test_the_files_it_reads_are_the_ones_pixelcam_writes(tmp_path: Path, cmu_small_path: Path,
                                                         random_model_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "service.cli.main", "analyze", str(cmu_small_path), "--model", str(random_model_path), "--out",
                           str(out), "--quiet", "--slide-heatmap"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert _setting("GEOJSON_FILE") == "result.geojson" and (out / _setting("GEOJSON_FILE")).is_file()
    assert _setting("HEATMAP_FILE") == SLIDE_HEATMAP and (out / _setting("HEATMAP_FILE")).is_file()


def test_the_routes_and_parameters_it_calls_exist(tmp_path: Path, redis_url: str) -> None:
    app = create_app(make_settings(tmp_path, redis_url, tmp_path / "models"))
    paths = app.openapi()["paths"]
    called = re.findall(r'"(/v1/[^"?]+)(?:\?([a-z_]+)=)?', SCRIPT.read_text())
    assert {p for p, _ in called} == {"/v1/jobs/${JOB_ID}/geojson", "/v1/jobs/${JOB_ID}/heatmap-slide.tif"}
    for path, param in called:
        route = paths[path.replace("${JOB_ID}", "{job_id}")]["get"]
        if param:
            assert param in {p["name"] for p in route.get("parameters", [])}
    with TestClient(app) as client:  # the server hands the script out too
        served = client.get("/static/viewer/qupath/pixelcam_import.groovy")
    assert served.status_code == 200 and served.content == SCRIPT.read_bytes()
