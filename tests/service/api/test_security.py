"""Security of the API: keys, per-key isolation, the browser cookie, admin keys, rate and job limits, CORS, 500s."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

SLIDE = "CMU-1-Small-Region.svs"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
ADMIN = "key-admin-0123456789abcdef"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def keyed(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Settings:
    return make_settings(tmp_path, redis_url, shell_models_dir, api_keys=f"{KEY_A},{KEY_B}", admin_keys=ADMIN)


@pytest.fixture()
def client(keyed: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed)) as c:
        yield c


def upload(client: TestClient, slides_dir: Path, key: str) -> dict[str, Any]:
    resp = client.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE},
                       headers=auth(key))
    assert resp.status_code in (200, 201), resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_keys_guard_everything_but_health_metrics_and_static_files(client: TestClient) -> None:
    for url in ("/v1/jobs", "/v1/models", "/v1/slides/" + "0" * 64, "/openapi.json", "/viewer/" + "0" * 64):
        resp = client.get(url)
        assert resp.status_code == 401, url
        assert resp.json()["error"] == "Unauthorized" and "Bearer" in resp.json()["detail"]
        assert resp.headers["www-authenticate"] == "Bearer"
        assert client.get(url, headers=auth("not-a-key-0123456789")).status_code == 401, url
    assert client.post("/v1/slides", content=b"x" * 100).status_code == 401
    for url in ("/healthz", "/readyz", "/metrics", "/static/viewer/viewer.js", "/"):
        assert client.get(url).status_code == 200, url
    assert client.get("/v1/jobs", headers=auth(KEY_A)).json() == {"jobs": []}
    assert client.get("/v1/models", headers=auth(ADMIN)).status_code == 200  # admin keys are API keys too


def test_a_key_sees_only_its_own_slides_and_jobs(client: TestClient, slides_dir: Path) -> None:
    slide_id = upload(client, slides_dir, KEY_A)["slide_id"]
    job = client.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_A))
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    absent = client.get("/v1/slides/" + "f" * 64, headers=auth(KEY_B))
    # another key's ids answer exactly like ids that do not exist (404, same error type): nothing leaks
    for url in (f"/v1/slides/{slide_id}", f"/v1/slides/{slide_id}.dzi", f"/v1/slides/{slide_id}/deepzoom",
                f"/v1/slides/{slide_id}_files/0/0_0.jpeg", f"/viewer/{slide_id}"):
        resp = client.get(url, headers=auth(KEY_B))
        assert resp.status_code == 404 and resp.json()["error"] == absent.json()["error"], url
        assert client.get(url, headers=auth(KEY_A)).status_code == 200, url
    for url in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/events",
                f"/v1/jobs/{job_id}/overlay.dzi"):
        resp = client.get(url, headers=auth(KEY_B))
        assert resp.status_code == 404 and resp.json()["error"] == "JobNotFound", url
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(KEY_B)).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(KEY_B)).status_code == 404
    stolen = client.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_B))
    assert stolen.status_code == 404 and stolen.json()["error"] == "SlideNotFound"
    assert client.get("/v1/jobs", headers=auth(KEY_B)).json()["jobs"] == []
    assert [j["job_id"] for j in client.get("/v1/jobs", headers=auth(KEY_A)).json()["jobs"]] == [job_id]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(KEY_A)).json()["state"] == "queued"
    # B holding the same bytes may upload them: then B has the slide, with a job of its own
    assert upload(client, slides_dir, KEY_B)["slide_id"] == slide_id
    own = client.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_B))
    assert own.status_code == 202 and own.json()["job_id"] != job_id
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(KEY_B)).status_code == 404


def test_the_viewer_works_with_a_key_given_once_in_the_address(client: TestClient, slides_dir: Path) -> None:
    slide_id = upload(client, slides_dir, KEY_A)["slide_id"]
    page = client.get(f"/viewer/{slide_id}", params={"api_key": KEY_A})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("pixelcam_key=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # the page's own requests (fetch and <img> tiles) carry only the cookie
    client.cookies.set("pixelcam_key", KEY_A)
    assert client.get(f"/v1/slides/{slide_id}/deepzoom").status_code == 200
    tile = client.get(f"/v1/slides/{slide_id}_files/0/0_0.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    client.cookies.set("pixelcam_key", KEY_B)
    assert client.get(f"/v1/slides/{slide_id}/deepzoom").status_code == 404
    client.cookies.clear()
    assert client.get(f"/viewer/{slide_id}", params={"api_key": "wrong-0123456789abcdef"}).status_code == 401


def test_only_admin_keys_change_the_models(client: TestClient) -> None:
    refused = client.put("/v1/models/default", json={"name": "random"}, headers=auth(KEY_A))
    assert refused.status_code == 403 and "PIXELCAM_ADMIN_KEYS" in refused.json()["detail"]
    assert client.post("/v1/models", params={"name": "x"}, content=b"onnx", headers=auth(KEY_A)).status_code == 403
    assert client.put("/v1/models/default", json={"name": "random"}, headers=auth(ADMIN)).status_code == 200


def test_request_rate_is_limited_per_key_with_retry_after(tmp_path: Path, redis_url: str,
                                                         shell_models_dir: Path) -> None:
    limited = make_settings(tmp_path, redis_url, shell_models_dir, api_keys=f"{KEY_A},{KEY_B}",
                            rate_limit_per_s=0.5, rate_burst=3)
    with TestClient(create_app(limited)) as c:
        codes = [c.get("/v1/jobs", headers=auth(KEY_A)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        last = c.get("/v1/jobs", headers=auth(KEY_A))
        assert last.status_code == 429 and last.json()["error"] == "RateLimited"
        assert 1 <= int(last.headers["retry-after"]) <= 2
        assert c.get("/v1/jobs", headers=auth(KEY_B)).status_code == 200  # each key has its own budget
        guesses = [c.get("/v1/jobs", headers=auth(f"guess-{i:016d}")).status_code for i in range(4)]
        assert guesses == [401, 401, 401, 429]  # guessing keys spends the client address's budget
        assert all(c.get("/healthz").status_code == 200 for _ in range(5))  # probes are never limited


def test_unfinished_jobs_per_key_are_limited(tmp_path: Path, redis_url: str, shell_models_dir: Path,
                                             slides_dir: Path) -> None:
    limited = make_settings(tmp_path, redis_url, shell_models_dir, api_keys=KEY_A, max_active_jobs_per_key=1)
    with TestClient(create_app(limited)) as c:
        slide_id = upload(c, slides_dir, KEY_A)["slide_id"]
        first = c.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_A))
        assert first.status_code == 202
        second = c.post("/v1/jobs", json={"slide_id": slide_id, "options": {"min_tissue": 0.5}}, headers=auth(KEY_A))
        assert second.status_code == 429 and "PIXELCAM_MAX_ACTIVE_JOBS_PER_KEY" in second.json()["detail"]
        assert int(second.headers["retry-after"]) >= 1
        same = c.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_A))
        assert same.status_code == 200 and same.json()["job_id"] == first.json()["job_id"]
        c.post(f"/v1/jobs/{first.json()['job_id']}/cancel", headers=auth(KEY_A))
        again = c.post("/v1/jobs", json={"slide_id": slide_id, "options": {"min_tissue": 0.5}}, headers=auth(KEY_A))
        assert again.status_code == 202


def test_cors_allows_only_the_configured_origins(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> None:
    preflight = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    with_cors = make_settings(tmp_path, redis_url, shell_models_dir, api_keys=KEY_A,
                              cors_origins="https://viewer.example")
    with TestClient(create_app(with_cors)) as c:
        ok = c.options("/v1/jobs", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        other = c.options("/v1/jobs", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        simple = c.get("/v1/jobs", headers={"Origin": "https://viewer.example", **auth(KEY_A)})
        assert simple.headers["access-control-allow-origin"] == "https://viewer.example"
    without = make_settings(tmp_path / "b", redis_url, shell_models_dir)
    with TestClient(create_app(without)) as c:
        assert "access-control-allow-origin" not in c.get("/v1/jobs", headers={"Origin": "https://x.example"}).headers


def test_unexpected_errors_are_json_500_with_an_error_id_and_no_trace(settings: Settings, slides_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from service.api.routes import jobs

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail at /srv/internal/path.py")

    monkeypatch.setattr(jobs, "job_public", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        slide = c.post("/v1/slides", content=(slides_dir / SLIDE).read_bytes(), params={"filename": SLIDE})
        with caplog.at_level(logging.ERROR, logger="service.api.app"):
            resp = c.post("/v1/jobs", json={"slide_id": slide.json()["slide_id"]})
        assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
        body = resp.json()
        assert body["error"] == "InternalError" and len(body["error_id"]) == 12
        assert "secret" not in resp.text and "Traceback" not in resp.text and "/srv" not in resp.text
        assert body["error_id"] in caplog.text and "secret detail" in caplog.text  # the log has the trace
        assert c.get("/healthz").status_code == 200  # and the server keeps serving


def test_no_path_is_built_from_names_in_requests(client: TestClient, keyed: Settings, tmp_path: Path,
                                                 slides_dir: Path) -> None:
    data = (slides_dir / SLIDE).read_bytes()
    names = ["../../../../tmp/evil.svs", "..\\..\\evil.svs", "/etc/passwd.svs", "スライド名前.svs",
             "a\x00b.svs", "x" * 5000 + ".svs", "evil.svs/../../../x", ".svs", "CON.svs"]
    before = {p for p in tmp_path.rglob("*") if "storage" not in p.parts}
    for name in names:
        resp = client.post("/v1/slides", content=data, params={"filename": name}, headers=auth(KEY_A))
        assert resp.status_code in (200, 201), (name, resp.text)
    stored = [p.relative_to(keyed.storage_dir) for p in keyed.storage_dir.rglob("*") if p.is_file()]
    slide_id = resp.json()["slide_id"]
    assert sorted(map(str, stored)) == [f"slides/{slide_id}/info.json", f"slides/{slide_id}/slide.svs"]
    assert {p for p in tmp_path.rglob("*") if "storage" not in p.parts} == before
    for url in ("/static/viewer/..%2F..%2Fsettings.py", "/static/viewer/../../settings.py",
                "/static/openseadragon/..%2F..%2F..%2Fpackage.json", "/v1/models/..%2F..%2Fetc%2Fpasswd",
                "/v1/jobs/..%2F..%2Fslides/result", "/v1/slides/..%2F..%2Fjobs.dzi"):
        resp = client.get(url, headers=auth(KEY_A))
        assert resp.status_code == 404, url
        assert resp.headers["content-type"].startswith("application/json"), url
    model = client.post("/v1/models", params={"name": "../../evil"}, content=b"x", headers=auth(ADMIN))
    assert model.status_code == 415 and "not a usable model name" in model.json()["detail"]


def test_short_or_malformed_keys_are_refused_at_startup(tmp_path: Path, redis_url: str) -> None:
    for bad in ("short", "has space in it 0123456789", "semi;colon0123456789"):
        with pytest.raises(ValueError, match="at least 16 characters"):
            make_settings(tmp_path, redis_url, api_keys=bad)
    assert make_settings(tmp_path, redis_url, api_keys=f" {KEY_A} , {KEY_B} ").api_key_list == [KEY_A, KEY_B]


def test_rate_limiter_refills_and_forgets_the_least_recent_client_beyond_its_bound() -> None:
    from service.api.security import RateLimiter

    limiter = RateLimiter(rate_per_s=2.0, burst=2, max_clients=3)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]  # burst of 2, then wait 1/rate
    assert limiter.take("a", now=0.5) == 0.0  # one token back after 0.5 s at 2/s
    for who in ("b", "c", "a", "d"):  # "b" is now the least recently seen of four clients: forgotten
        limiter.take(who, now=0.6)
    assert limiter.clients() == ["c", "a", "d"]
    assert limiter.take("a", now=0.6) > 0  # a client that is remembered keeps its empty bucket
    assert limiter.take("b", now=0.6) == 0.0  # a forgotten one starts with a full bucket again


def test_keys_in_addresses_never_reach_the_access_log(keyed: Settings) -> None:
    import httpx

    from tests.service.shell import live_app

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    with live_app(keyed) as port:
        access = logging.getLogger("uvicorn.access")
        keep, level = Keep(), access.level
        access.addHandler(keep)
        access.setLevel(logging.INFO)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                assert http.get("/", params={"api_key": KEY_A}).status_code == 200
                assert http.get("/v1/jobs", params={"x": "1", "api_key": KEY_B, "y": "2"}).status_code in (200, 401)
                assert http.get("/v1/jobs", params={"access_token": KEY_B}).status_code in (200, 401)
        finally:
            access.removeHandler(keep)
            access.setLevel(level)
    assert len(keep.lines) >= 3, keep.lines
    text = "\n".join(keep.lines)
    assert KEY_A not in text and KEY_B not in text, text
    assert "api_key=[redacted]" in text and "x=1" in text and "y=2" in text


def test_a_key_deletes_only_its_own_share_of_a_slide(client: TestClient, keyed: Settings, slides_dir: Path) -> None:
    slide_id = upload(client, slides_dir, KEY_A)["slide_id"]
    assert upload(client, slides_dir, KEY_B)["slide_id"] == slide_id  # the same bytes: one stored file, two owners
    job_a = client.post("/v1/jobs", json={"slide_id": slide_id}, headers=auth(KEY_A)).json()["job_id"]
    job_b = client.post("/v1/jobs", json={"slide_id": slide_id, "options": {"min_tissue": 0.3}},
                        headers=auth(KEY_B)).json()["job_id"]
    for job_id, key in ((job_a, KEY_A), (job_b, KEY_B)):
        client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert client.delete(f"/v1/jobs/{job_b}", headers=auth(KEY_A)).status_code == 404  # not A's job
    assert client.delete(f"/v1/slides/{slide_id}", headers=auth(KEY_A)).status_code == 204
    assert client.get(f"/v1/slides/{slide_id}", headers=auth(KEY_A)).status_code == 404  # gone for A
    assert client.get(f"/v1/jobs/{job_a}", headers=auth(KEY_A)).status_code == 404
    assert client.get(f"/v1/slides/{slide_id}", headers=auth(KEY_B)).status_code == 200  # B keeps its copy
    assert client.get(f"/v1/jobs/{job_b}", headers=auth(KEY_B)).json()["state"] == "cancelled"
    assert (keyed.slides_dir / slide_id).is_dir()
    assert client.delete(f"/v1/slides/{slide_id}", headers=auth(KEY_B)).status_code == 204  # the last owner
    assert not (keyed.slides_dir / slide_id).exists() and not (keyed.jobs_dir / job_b).exists()


def test_openapi_requires_the_bearer_key_when_keys_are_set(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers=auth(KEY_A)).json()
    assert doc["security"] == [{"bearer": []}] and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/metrics"]["get"]["security"] == []
