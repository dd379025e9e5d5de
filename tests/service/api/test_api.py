"""The HTTP API on a real Redis: uploads, limits, models, health, metrics and errors (no worker needed here)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _upload(client: TestClient, path: Path, **params: str) -> object:
    return client.post("/v1/slides", content=path.read_bytes(), params={"filename": path.name, **params},
                       headers={"Content-Type": "application/octet-stream"})


def test_upload_hashes_validates_and_stores_once(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    path = slides_dir / SLIDE
    first = _upload(client, path)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["slide_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["created"] is True and body["size_bytes"] == path.stat().st_size
    assert body["info"]["l0_size_wh"] == [2220, 2967]
    stored = settings.slides_dir / body["slide_id"]
    assert sorted(p.name for p in stored.iterdir()) == ["info.json", "slide.svs"]
    again = _upload(client, path, filename="renamed.svs")
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["filename"] == SLIDE  # the first upload's record is kept, nothing was rewritten
    got = client.get(f"/v1/slides/{body['slide_id']}")
    assert got.status_code == 200 and got.json()["slide_id"] == body["slide_id"]
    leftovers = [p.name for p in settings.slides_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path: Path, redis_url: str,
                                                        shell_models_dir: Path, slides_dir: Path) -> None:
    limited = make_settings(tmp_path, redis_url, shell_models_dir, max_upload_bytes=100_000)
    with TestClient(create_app(limited)) as c:
        resp = _upload(c, slides_dir / SLIDE)
        assert resp.status_code == 413
        assert resp.json()["error"] == "UploadTooLarge" and "PIXELCAM_MAX_UPLOAD_BYTES" in resp.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
            data = (slides_dir / SLIDE).read_bytes()
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        streamed = c.post("/v1/slides", content=chunks(), params={"filename": SLIDE})
        assert streamed.status_code == 413

        def form_chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.svs"\r\n\r\n'
            yield from chunks()
            yield b"\r\n--b--\r\n"

        form = c.post("/v1/slides", content=form_chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert form.status_code == 413
    assert list(limited.slides_dir.iterdir()) == []


def test_unreadable_upload_is_refused_and_leaves_nothing(client: TestClient, settings: Settings,
                                                         slides_dir: Path) -> None:
    resp = client.post("/v1/slides", content=b"not a slide at all" * 100, params={"filename": "x.svs"})
    assert resp.status_code == 415
    assert resp.json()["error"] == "InvalidUpload" and resp.json()["detail"]
    empty = client.post("/v1/slides", content=b"", params={"filename": "x.svs"})
    assert empty.status_code == 415
    junk_form = client.post("/v1/slides", files={"file": ("a.svs", b"abc")})
    assert junk_form.status_code == 415
    no_file = client.post("/v1/slides", data={"name": "x"}, files={})
    assert no_file.status_code in (415, 422)
    fields_only = client.post("/v1/slides", content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n",
                              headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert fields_only.status_code == 415 and "no file part" in fields_only.json()["detail"]
    assert list(settings.slides_dir.iterdir()) == []


def test_form_upload_streams_the_file_part(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    data = (slides_dir / SLIDE).read_bytes()
    resp = client.post("/v1/slides", data={"note": "ignored"}, files={"file": (SLIDE, data, "image/tiff")})
    assert resp.status_code == 201, resp.text
    assert resp.json()["slide_id"] == hashlib.sha256(data).hexdigest() and resp.json()["filename"] == SLIDE
    assert (settings.slides_dir / resp.json()["slide_id"] / "slide.svs").read_bytes() == data


def test_unknown_ids_are_404_json(client: TestClient) -> None:
    for url in ("/v1/slides/" + "0" * 64, "/v1/slides/not-a-hash", "/v1/jobs/" + "0" * 32,
                "/v1/jobs/" + "0" * 32 + "/result", "/v1/jobs/" + "0" * 32 + "/geojson",
                "/v1/jobs/" + "0" * 32 + "/heatmap.png", "/v1/jobs/" + "0" * 32 + "/events",
                "/v1/models/nope", "/v1/nothing-here"):
        resp = client.get(url)
        assert resp.status_code == 404, url
        assert resp.headers["content-type"].startswith("application/json"), url
        assert resp.json()["detail"], url
    assert client.post("/v1/jobs/" + "0" * 32 + "/cancel").status_code == 404
    job = client.post("/v1/jobs", json={"slide_id": "0" * 64})
    assert job.status_code == 404 and job.json()["error"] == "SlideNotFound"


def test_models_are_listed_validated_and_the_default_can_change(client: TestClient, settings: Settings,
                                                                shell_model_path: Path) -> None:
    listing = client.get("/v1/models").json()
    assert listing["default"] == "random"
    assert [m["name"] for m in listing["models"]] == ["random"]
    random_model = listing["models"][0]
    assert random_model["valid"] and random_model["metadata"]["input_size"] > 0
    assert random_model["sha256"] == hashlib.sha256(shell_model_path.read_bytes()).hexdigest()
    # a new model dropped into the directory and a broken one: both seen without restart, the broken one refused
    shutil.copyfile(shell_model_path, settings.models_dir / "second.onnx")
    (settings.models_dir / "broken.onnx").write_bytes(b"not onnx")
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"random", "second", "broken"}
    assert not models["broken"]["valid"] and models["broken"]["reason"]
    assert client.get("/v1/models/broken").status_code == 409
    assert client.put("/v1/models/default", json={"name": "broken"}).status_code == 409
    changed = client.put("/v1/models/default", json={"name": "second"})
    assert changed.status_code == 200 and changed.json()["default"] is True
    assert client.get("/v1/models").json()["default"] == "second"


def test_jobs_name_their_model_by_checksum(client: TestClient, settings: Settings, slides_dir: Path) -> None:
    slide_id = _upload(client, slides_dir / SLIDE).json()["slide_id"]
    first = client.post("/v1/jobs", json={"slide_id": slide_id, "model": "random"})
    assert first.status_code == 202 and first.json()["model"] == "random"
    # the same bytes under another name are the same model: the job is found, not queued twice
    shutil.copyfile(settings.models_dir / "random.onnx", settings.models_dir / "copy.onnx")
    same = client.post("/v1/jobs", json={"slide_id": slide_id, "model": "copy"})
    assert same.status_code == 200 and same.json()["job_id"] == first.json()["job_id"]
    assert same.json()["model_sha256"] == client.get("/v1/models/copy").json()["sha256"]
    overridden = client.post("/v1/jobs", json={"slide_id": slide_id, "mpp": 0.25})
    assert overridden.status_code == 202 and overridden.json()["mpp"] == 0.25
    assert overridden.json()["job_id"] != first.json()["job_id"]
    assert overridden.json()["options"]["mpp_override"] == 0.25
    extra = client.post("/v1/jobs", json={"slide_id": slide_id, "colour": "red"})
    assert extra.status_code == 422
    queued = client.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
    assert [j["job_id"] for j in queued] == [overridden.json()["job_id"], first.json()["job_id"]]
    assert client.get("/v1/jobs", params={"state": "done"}).json()["jobs"] == []
    assert client.get("/v1/jobs", params={"state": "nonsense"}).status_code == 422


def test_model_upload_validates_against_the_contract(client: TestClient, settings: Settings,
                                                     shell_model_path: Path) -> None:
    bad = client.post("/v1/models", params={"name": "junk"}, content=b"\x00" * 100)
    assert bad.status_code == 415 and "refused" in bad.json()["detail"]
    assert "the uploaded model is not a loadable ONNX model" in bad.json()["detail"]
    assert str(settings.storage_dir) not in bad.text and ".upload-" not in bad.text  # no server path in errors
    good = client.post("/v1/models", params={"name": "uploaded-1"}, content=shell_model_path.read_bytes())
    assert good.status_code == 201, good.text
    assert good.json()["valid"] and good.json()["name"] == "uploaded-1"
    dup = client.post("/v1/models", params={"name": "uploaded-1"}, content=shell_model_path.read_bytes())
    assert dup.status_code == 415
    evil = client.post("/v1/models", params={"name": "../escape"}, content=shell_model_path.read_bytes())
    assert evil.status_code == 415
    names = sorted(p.name for p in settings.models_dir.iterdir())
    assert names == ["random.onnx", "uploaded-1.onnx"]


def test_health_readiness_metrics_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "ok"
    assert ready.json()["checks"]["workers"] == "0 alive"
    text = client.get("/metrics").text
    for name in ("pixelcam_jobs{state=\"queued\"}", "pixelcam_queue_depth{status=\"waiting\"}",
                 "pixelcam_tiles_per_second", "pixelcam_batch_fill", "pixelcam_inference_latency_seconds_bucket"):
        assert name in text, name
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/slides", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/models", "/v1/analyze"} <= set(paths)


def test_http_requests_are_timed_by_route_template_not_by_id(client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        assert client.get("/v1/jobs/" + "a" * 32).status_code == 404
    client.get("/v1/jobs/" + "b" * 32)
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/healthz").status_code == 200
    counts = {tuple(sorted(s.labels.items())): s.value
              for f in text_string_to_metric_families(client.get("/metrics").text)
              if f.name == "pixelcam_http_request_duration_seconds" for s in f.samples if s.name.endswith("_count")}
    assert counts[(("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))] == 4  # ids share a label
    assert counts[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] == 1
    assert counts[(("method", "GET"), ("route", "/healthz"), ("status", "200"))] == 1
    assert not any("a" * 32 in dict(labels)["route"] for labels in counts)


def test_openapi_declares_media_types_the_repeated_job_and_the_bearer_keys(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]

    def media(path: str, method: str = "get") -> set[str]:
        return set(paths[path][method]["responses"]["200"].get("content", {}))

    assert media("/v1/jobs/{job_id}/heatmap.png") == {"image/png"}
    assert media("/v1/jobs/{job_id}/heatmap.tif") == {"image/tiff"}
    assert media("/v1/jobs/{job_id}/geojson") == {"application/geo+json", "application/gzip"}
    assert media("/v1/slides/{slide_id}_files/{level}/{col}_{row}.{fmt}") == {"image/jpeg", "image/png"}
    assert media("/v1/jobs/{job_id}/overlay_files/{level}/{col}_{row}.png") == {"image/png"}
    assert media("/v1/slides/{slide_id}.dzi") == {"application/xml"}
    assert media("/v1/jobs/{job_id}/events") == {"text/event-stream"}
    assert media("/metrics") == {"text/plain; version=0.0.4"}
    png = paths["/v1/jobs/{job_id}/heatmap.png"]["get"]["responses"]["200"]["content"]["image/png"]["schema"]
    assert png == {"type": "string", "format": "binary"}
    for route in ("/v1/jobs", "/v1/analyze"):  # 202 queued, 200 the same job again
        assert {"200", "202"} <= set(paths[route]["post"]["responses"])
    assert set(paths["/v1/jobs/{job_id}"]["delete"]["responses"]) >= {"204", "409"}
    assert doc["components"]["securitySchemes"]["bearer"] == {**doc["components"]["securitySchemes"]["bearer"],
                                                             "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{}, {"bearer": []}]  # an open server: the key is optional
    assert paths["/healthz"]["get"]["security"] == [] and "security" not in paths["/v1/jobs"]["post"]


def test_readyz_is_503_without_a_valid_model(tmp_path: Path, redis_url: str) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    with TestClient(create_app(make_settings(tmp_path, redis_url, empty))) as c:
        resp = c.get("/readyz")
        assert resp.status_code == 503 and "no valid model" in resp.json()["checks"]["model"]


def test_settings_come_from_the_environment_and_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIXELCAM_STORAGE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("PIXELCAM_WORKERS", "3")
    monkeypatch.setenv("PIXELCAM_CLAIM_IDLE_S", "30")
    monkeypatch.delenv("PIXELCAM_MODELS_DIR", raising=False)
    loaded = Settings()
    assert loaded.workers == 3 and loaded.claim_idle_s == 30.0
    assert loaded.models_dir == tmp_path / "store" / "models"  # the default lives in the storage dir
    monkeypatch.setenv("PIXELCAM_MODELS_DIR", str(tmp_path / "elsewhere"))
    moved = Settings()
    assert moved.models_dir == tmp_path / "elsewhere"
    for name, value in moved.to_env().items():  # what `pixelcam serve` hands its workers
        monkeypatch.setenv(name, value)
    assert Settings() == moved
    monkeypatch.setenv("PIXELCAM_HEARTBEAT_S", "20")
    with pytest.raises(ValueError, match="PIXELCAM_HEARTBEAT_S"):
        Settings()
    monkeypatch.setenv("PIXELCAM_HEARTBEAT_S", "5")
    monkeypatch.setenv("PIXELCAM_REDIS_PREFIX", "a b")
    with pytest.raises(ValueError, match="PIXELCAM_REDIS_PREFIX"):
        Settings()


def test_slides_without_mpp_need_an_override_and_refused_formats_say_why(client: TestClient, settings: Settings,
                                                                         slides_dir: Path) -> None:
    no_mpp = _upload(client, slides_dir / "kidney-48-5.tif")
    assert no_mpp.status_code == 201, no_mpp.text
    info = no_mpp.json()["info"]
    assert info["mpp_x"] is None and "mpp" in info["mpp_missing"]
    slide_id = no_mpp.json()["slide_id"]
    refused = client.post("/v1/jobs", json={"slide_id": slide_id})
    assert refused.status_code == 422 and '"mpp"' in refused.json()["detail"]
    accepted = client.post("/v1/jobs", json={"slide_id": slide_id, "mpp": 2.0})
    assert accepted.status_code == 202 and accepted.json()["mpp"] == 2.0
    fluorescence = _upload(client, slides_dir / "small_vectra.qptiff")
    assert fluorescence.status_code == 415 and fluorescence.json()["detail"].startswith("not a slide this service")
    assert sorted(p.name for p in settings.slides_dir.iterdir()) == [slide_id]


def test_options_and_mpp_are_checked_at_submit_against_the_one_schema(client: TestClient, slides_dir: Path) -> None:
    slide_id = _upload(client, slides_dir / SLIDE).json()["slide_id"]
    bad = [
        ({"mpp": 0.03}, "mpp"),  # below the slide layer's range: once accepted here and refused by the worker
        ({"options": {"mpp_override": 0.03}}, "mpp_override"),
        ({"options": {"hm_downsample": 1e9}}, "hm_downsample"),
        ({"options": {"simplify_hm": -5}}, "simplify_hm"),
        ({"options": {"min_region_cells": "abc"}}, "min_region_cells"),
        ({"options": {"blend": "max"}}, "blend"),
        ({"options": {"overlap": 0.999}}, "overlap"),  # 10^6 times the tiles: once accepted, flooding the queue
        ({"options": {"overlap": 0.95}}, "overlap"),
        ({"options": {"tile_size": 3}}, "tile_size"),  # unknown option names are refused, not dropped
    ]
    for extra, name in bad:
        resp = client.post("/v1/jobs", json={"slide_id": slide_id, **extra})
        assert resp.status_code == 422, extra
        assert resp.json()["error"] == "ValidationError" and name in resp.json()["detail"], resp.json()
    assert client.get("/v1/jobs").json()["jobs"] == [], "nothing was queued for a refused request"
    one = client.post("/v1/analyze", content=(slides_dir / SLIDE).read_bytes(),
                      params={"filename": SLIDE, "options": '{"overlap": 1.5}'})
    assert one.status_code == 422 and "overlap" in one.json()["detail"]
    ok = client.post("/v1/jobs", json={"slide_id": slide_id, "mpp": 0.05, "options": {"hm_downsample": 8}})
    assert ok.status_code == 202 and ok.json()["options"]["hm_downsample"] == 8
    # OpenAPI shows the same ranges the core checks
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    overlap = spec["AnalysisOptionsIn"]["properties"]["overlap"]
    assert overlap["minimum"] == 0 and overlap["maximum"] == 0.9
    mpp = next(s for s in spec["JobCreate"]["properties"]["mpp"]["anyOf"] if s.get("type") == "number")
    assert (mpp["minimum"], mpp["maximum"]) == (0.05, 100.0)


def test_long_values_are_not_echoed_whole_in_errors(client: TestClient) -> None:
    huge = "x" * 1_000_000
    for resp in (client.post("/v1/jobs", json={"slide_id": huge}), client.get(f"/v1/slides/{'a' * 6000}"),
                 client.post("/v1/jobs", json={"slide_id": "a" * 64, "options": {huge[:5000]: 1}})):
        assert 400 <= resp.status_code < 500, resp.text[:300]
        assert len(resp.json()["detail"]) < 2100, (resp.status_code, len(resp.json()["detail"]))
        assert "characters cut" in resp.json()["detail"] or len(resp.text) < 500
