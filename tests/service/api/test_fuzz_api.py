"""Schemathesis fuzzes every operation of the OpenAPI spec in-process (ASGI): no input may give a server error."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from service.api import create_app
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

MAX_EXAMPLES = 8  # per operation, mode and id kind: a few hundred requests, well under a minute


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str, random_model_path: Path) -> Settings:
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    models.mkdir()
    (models / "random.onnx").write_bytes(random_model_path.read_bytes())
    # small limits so that generated bodies exercise them; a high request rate so that the limiter stays out of it
    return make_settings(root, redis_url, models, max_upload_bytes=4 << 20, upload_idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def api_schema(fuzz_settings: Settings, slides_dir: Path) -> Iterator[Any]:
    app = create_app(fuzz_settings)
    with TestClient(app) as client:  # runs the lifespan (Redis, stores) for the whole module
        slide = client.post("/v1/slides", content=(slides_dir / "CMU-1-Small-Region.svs").read_bytes(),
                            params={"filename": "cmu.svs"})
        assert slide.status_code == 201, slide.text
        job = client.post("/v1/jobs", json={"slide_id": slide.json()["slide_id"],
                                            "options": {"write_detections": False}})
        assert job.status_code == 202, job.text
        Worker(fuzz_settings).run(burst=True)  # a finished job: results and overlays exist to be fuzzed
        assert client.get(f"/v1/jobs/{job.json()['job_id']}").json()["state"] == "done"
        ids = {"slide_id": slide.json()["slide_id"], "job_id": job.json()["job_id"]}
        yield schemathesis.openapi.from_asgi("/openapi.json", app), ids


def _modes(operation: Any) -> tuple[GenerationMode, ...]:
    """Positive cases always; negative ones where the schema has something to break (not just free-text ids)."""
    params = [*operation.path_parameters, *operation.query]
    constrained = any(p.definition.get("schema", {}) != {"type": "string", "title": p.definition.get("schema", {})
                                                         .get("title")} for p in params)
    if constrained or len(operation.body):
        return (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return (GenerationMode.POSITIVE,)


def _runs(operation: Any, ids: dict[str, str]) -> list[tuple[GenerationMode, dict[str, str] | None]]:
    """Generated ids (mostly 404s), and, for routes under a slide or job, the real ones (tiles, results...)."""
    names = {p.name for p in operation.path_parameters}
    real = {k: v for k, v in ids.items() if k in names}
    return [(mode, fixed) for fixed in ([None, real] if real else [None]) for mode in _modes(operation)]


def test_no_input_gives_a_server_error(api_schema: tuple[Any, dict[str, str]]) -> None:
    # schemathesis' own pytest plugin does not run under pytest 9 (it reads `Function._nodeid`), so each
    # operation's strategies are driven by hypothesis here: valid inputs and inputs that break the schema
    schema, ids = api_schema
    seen: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, fixed in _runs(operation, ids):

            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
            @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                response = case.call(timeout=30)
                what = f"{case.method} {case.formatted_path} {case.query}"
                seen.append(f"{response.status_code} {case.method} {case.path}")
                assert response.status_code < 500, f"{what}: {response.status_code} {response.text}"
                if response.status_code >= 400:
                    body = response.json()
                    assert body["error"] and body["detail"], (what, body)  # our JSON shape, with a message

            try:
                check()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise  # (a schema with nothing to break has no negative cases: that is fine)
    assert len(seen) > 100  # the fuzzing really ran
    codes = Counter(line.split()[0] for line in seen)
    print(f"fuzzed {len(seen)} requests over {len({line.split(' ', 1)[1] for line in seen})} operations: "
          f"{dict(sorted(codes.items()))}")
