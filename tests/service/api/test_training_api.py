"""`/v1/training-jobs` on a real Redis, without a trainer: every bad request is a 4xx that says what to do and
leaves nothing behind; a good one is queued with its folder; admin keys create, each key sees only its own."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.api.routes.jobs import sweep_expired
from service.settings import Settings
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

KEY_A = "key-a-0123456789abcdef"
ADMIN_1 = "key-admin1-0123456789abcdef"
ADMIN_2 = "key-admin2-0123456789abcdef"


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def upload(client: TestClient, path: Path, key: str | None = None) -> str:
    resp = client.post("/v1/slides", content=path.read_bytes(), params={"filename": path.name}, headers=auth(key))
    assert resp.status_code in (200, 201), resp.text
    return str(resp.json()["slide_id"])


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def uploaded(client: TestClient, mosaic_slides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four mosaics uploaded: slide_id, label and annotations per slide (the request's `slides`)."""
    return [{"slide_id": upload(client, m["path"]), "label": m["label"], "annotations": m["annotations"]}
            for m in mosaic_slides]


def _nothing_left(client: TestClient, settings: Settings, models_before: list[str]) -> None:
    assert client.get("/v1/training-jobs").json() == {"training_jobs": []}
    folder = settings.training_dir
    assert not folder.exists() or list(folder.iterdir()) == [], "a refused request left files behind"
    assert sorted(p.name for p in settings.models_dir.iterdir()) == models_before


def _bad_requests(slides: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], int, str]]:
    """(what, request body, status, a phrase the message must hold)."""
    cases: list[tuple[str, dict[str, Any], int, str]] = []

    def body(**changes: Any) -> dict[str, Any]:
        b: dict[str, Any] = {"slides": copy.deepcopy(slides), "config": {"quick": True}}
        b.update(changes)
        return b

    unknown = body()
    unknown["slides"][2]["slide_id"] = "0" * 64
    cases.append(("unknown slide id", unknown, 404, "slides[2].slide_id: no slide"))
    label = body()
    label["slides"][1]["label"] = "tumour"
    cases.append(("label outside the classes", label, 422, "'tumour' is not one of the config's classes"))
    classes = body(config={"quick": True, "class_names": ["normal", "tumour"], "positive_class": "tumour"})
    cases.append(("labels outside configured classes", classes, 422, "'benign' is not one of the config's classes"))
    not_fc = body()
    not_fc["slides"][0]["annotations"] = {"type": "Feature", "geometry": None, "properties": {}}
    cases.append(("annotations not a FeatureCollection", not_fc, 422, "must be a GeoJSON FeatureCollection"))
    as_list = body()
    as_list["slides"][0]["annotations"] = slides[0]["annotations"]["features"]
    cases.append(("annotations a bare list", as_list, 422, "must be a GeoJSON FeatureCollection"))
    points = body()
    points["slides"][0]["annotations"] = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}}]}
    cases.append(("annotations without polygons", points, 422, "holds no Polygon or MultiPolygon"))
    broken = body()
    broken["slides"][3]["annotations"] = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5]]]}, "properties": {}}]}
    cases.append(("unreadable polygon", broken, 422, "slides[3].annotations"))
    elsewhere = body()
    elsewhere["slides"][0]["annotations"] = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Gland"}}, "geometry": {
            "type": "Polygon", "coordinates": [[[1e6, 1e6], [1e6 + 50, 1e6], [1e6 + 50, 1e6 + 50], [1e6, 1e6]]]}}]}
    cases.append(("polygons off the slide", elsewhere, 422, "no polygon lies on the slide"))
    cases.append(("unknown config field", body(config={"quick": True, "epoch": 5}), 422, "unknown field(s) epoch"))
    cases.append(("config out of range", body(config={"epochs": 0}), 422, "config.epochs"))
    cases.append(("config of the wrong type", body(config={"epochs": "five"}), 422, "config.epochs"))
    cases.append(("config the trainer owns", body(config={"run_dir": "/tmp/x"}), 422, "run_dir: set by the trainer"))
    cases.append(("config naming a server file", body(config={"init_from": "/etc/weights.pt"}), 422,
                  "config.init_from names a file"))
    cases.append(("config the recipe refuses", body(config={"positive_class": "tumour"}), 422,
                  "positive_class 'tumour' is not one of"))
    one_class = body(slides=[s for s in copy.deepcopy(slides) if s["label"] == "benign"])
    cases.append(("no slides of one class", one_class, 422, "no slide of class 'malignant'"))
    twice = body(slides=[*copy.deepcopy(slides), copy.deepcopy(slides[0])])
    cases.append(("a slide twice", twice, 422, "is slides[0] again"))
    cases.append(("a name the models directory refuses", body(name="../evil"), 422, "name"))
    cases.append(("no slides", body(slides=[]), 422, "slides"))
    return cases


def test_bad_requests_are_4xx_that_say_what_to_do_and_leave_nothing(client: TestClient, settings: Settings,
                                                                   uploaded: list[dict[str, Any]]) -> None:
    models_before = sorted(p.name for p in settings.models_dir.iterdir())
    for what, body, status, phrase in _bad_requests(uploaded):
        resp = client.post("/v1/training-jobs", json=body)
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        detail = resp.json()["detail"]
        assert phrase in detail, (what, detail)
        assert resp.json()["error"], what
    _nothing_left(client, settings, models_before)


def test_a_good_request_is_queued_with_its_folder_and_can_be_cancelled_and_deleted(
        client: TestClient, settings: Settings, uploaded: list[dict[str, Any]]) -> None:
    resp = client.post("/v1/training-jobs", json={"slides": uploaded, "config": {"quick": True}, "name": "mine-v1"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/training-jobs/{job['id']}"
    assert job["state"] == "queued" and job["name"] == "mine-v1" and job["model"] is None
    assert job["slides"] == 4 and job["classes"] == {"benign": 2, "malignant": 2}
    assert job["config"] == {"quick": True}
    assert "none is running" in job["message"] and "pixelcam trainer" in job["message"]  # no trainer here
    folder = settings.training_dir / job["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["annotations", "request.json"]
    assert len(list((folder / "annotations").glob("*.geojson"))) == 4
    assert [j["id"] for j in client.get("/v1/training-jobs").json()["training_jobs"]] == [job["id"]]
    assert client.get("/v1/training-jobs", params={"state": "done"}).json() == {"training_jobs": []}
    assert client.get("/v1/training-jobs", params={"state": "stitching"}).status_code == 422
    # the name is taken while the job is unfinished, and a model's existing name is refused
    again = client.post("/v1/training-jobs", json={"slides": uploaded, "name": "mine-v1"})
    assert again.status_code == 409 and "another unfinished training job" in again.json()["detail"]
    taken = client.post("/v1/training-jobs", json={"slides": uploaded, "name": "random"})
    assert taken.status_code == 409 and "exists already" in taken.json()["detail"]
    assert client.delete(f"/v1/training-jobs/{job['id']}").status_code == 409  # unfinished: cancel first
    # its slides stay while it is unfinished: no delete, no retention
    slide = uploaded[0]["slide_id"]
    refused = client.delete(f"/v1/slides/{slide}")
    assert refused.status_code == 409 and "unfinished training job" in refused.json()["detail"]
    state = client.app.state  # type: ignore[attr-defined]
    retention = settings.model_copy(update={"retention_days": 1.0})
    assert sweep_expired(state.queue, retention, state.slides, None, now=time.time() + 1e6,
                         training=state.training) == (0, 0)
    assert client.get(f"/v1/slides/{slide}").status_code == 200
    cancelled = client.post(f"/v1/training-jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/v1/training-jobs/{job['id']}/cancel").json()["state"] == "cancelled"  # idempotent
    events = client.get(f"/v1/training-jobs/{job['id']}/events")
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.text.count("event: progress") == 1 and 'event: end\ndata: {"state": "cancelled"' in events.text
    # the name is free again once the job ended
    reuse = client.post("/v1/training-jobs", json={"slides": uploaded, "config": {"quick": True}, "name": "mine-v1"})
    assert reuse.status_code == 202, reuse.text
    # retention takes the ended job (record and folder), not the queued one nor the slides it trains on
    assert sweep_expired(state.queue, retention, state.slides, None, now=time.time() + 1e6,
                         training=state.training) == (1, 0)
    assert not folder.exists() and client.get(f"/v1/training-jobs/{job['id']}").status_code == 404
    assert [j["id"] for j in client.get("/v1/training-jobs").json()["training_jobs"]] == [reuse.json()["id"]]
    assert client.post(f"/v1/training-jobs/{reuse.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/training-jobs/{reuse.json()['id']}").status_code == 204
    assert not (settings.training_dir / reuse.json()["id"]).exists()
    assert client.get(f"/v1/training-jobs/{reuse.json()['id']}").status_code == 404
    default_name = client.post("/v1/training-jobs", json={"slides": uploaded})
    assert default_name.status_code == 202
    assert default_name.json()["name"] == f"trained-{default_name.json()['id'][:12]}"


def test_unknown_training_ids_are_404(client: TestClient) -> None:
    for method, url in (("GET", "/v1/training-jobs/nope"), ("GET", "/v1/training-jobs/" + "0" * 32 + "/events"),
                        ("POST", "/v1/training-jobs/" + "a" * 32 + "/cancel"), ("DELETE", "/v1/training-jobs/x")):
        resp = client.request(method, url)
        assert resp.status_code == 404, (method, url, resp.text)
        assert resp.json()["error"] == "TrainingJobNotFound" and "GET /v1/training-jobs" in resp.json()["detail"]


def test_creating_needs_an_admin_key_and_each_key_sees_only_its_own_training_jobs(
        tmp_path: Path, redis_url: str, shell_models_dir: Path, mosaic_slides: list[dict[str, Any]]) -> None:
    keyed = make_settings(tmp_path, redis_url, shell_models_dir, api_keys=KEY_A, admin_keys=f"{ADMIN_1},{ADMIN_2}")
    with TestClient(create_app(keyed)) as c:
        assert c.post("/v1/training-jobs", json={"slides": []}).status_code == 401
        slides_a = [{"slide_id": upload(c, m["path"], KEY_A), "label": m["label"]} for m in mosaic_slides]
        refused = c.post("/v1/training-jobs", json={"slides": slides_a}, headers=auth(KEY_A))
        assert refused.status_code == 403 and "PIXELCAM_ADMIN_KEYS" in refused.json()["detail"]
        # an admin key trains only on slides it uploaded itself (another key's are 404, as everywhere)
        others = c.post("/v1/training-jobs", json={"slides": slides_a}, headers=auth(ADMIN_1))
        assert others.status_code == 404 and "slides[0].slide_id: no slide" in others.json()["detail"]
        slides_1 = [{"slide_id": upload(c, m["path"], ADMIN_1), "label": m["label"]} for m in mosaic_slides]
        created = c.post("/v1/training-jobs", json={"slides": slides_1, "config": {"quick": True}},
                         headers=auth(ADMIN_1))
        assert created.status_code == 202, created.text
        tid = created.json()["id"]
        assert c.get(f"/v1/training-jobs/{tid}", headers=auth(ADMIN_1)).json()["state"] == "queued"
        for key in (ADMIN_2, KEY_A):
            assert c.get("/v1/training-jobs", headers=auth(key)).json() == {"training_jobs": []}
            for method, url in (("GET", f"/v1/training-jobs/{tid}"), ("GET", f"/v1/training-jobs/{tid}/events"),
                                ("POST", f"/v1/training-jobs/{tid}/cancel"), ("DELETE", f"/v1/training-jobs/{tid}")):
                assert c.request(method, url, headers=auth(key)).status_code == 404, (key, method, url)
        listed = c.get("/v1/training-jobs", headers=auth(ADMIN_1)).json()["training_jobs"]
        assert [j["id"] for j in listed] == [tid]
        assert c.post(f"/v1/training-jobs/{tid}/cancel", headers=auth(ADMIN_1)).json()["state"] == "cancelled"


def test_openapi_documents_the_training_routes_and_the_config_fields(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/training-jobs", "/v1/training-jobs/{training_id}", "/v1/training-jobs/{training_id}/events",
            "/v1/training-jobs/{training_id}/cancel"} <= set(paths)
    post = paths["/v1/training-jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/TrainingJobCreate")
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/TrainingJobPublic")
    assert {"403", "404", "409", "422"} <= set(post["responses"])
    events = paths["/v1/training-jobs/{training_id}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
    schemas = spec["components"]["schemas"]
    config = schemas["TrainConfigIn"]["properties"]
    assert config["epochs"]["type"] == "integer" and config["epochs"]["minimum"] == 1
    assert config["quick"]["type"] == "boolean" and config["class_names"]["type"] == "array"
    assert "run_dir" not in config and "manifest" not in config and "export_name" not in config
    assert {"id", "state", "stage", "epoch", "progress", "metrics", "error", "model"} <= set(
        schemas["TrainingJobPublic"]["properties"])
    assert "evaluation" in schemas["ModelPublic"]["properties"]
