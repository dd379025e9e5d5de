"""Bad DICOMweb references and early DICOM requests get a clear 4xx (or a 502 naming the archive's fault), checked
before any network access where the request alone decides, and nothing half-imported is left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient

from service.api import create_app
from service.jobs.redis_server import free_port
from service.jobs.worker import Worker
from service.settings import Settings
from tests.service.dicom.conftest import PASSWORD, USER, DicomizedSlide, Orthanc
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

UID = "1.2.826.0.1.3680043.8.498.1"


def _client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture()
def closed_client(settings: Settings) -> Iterator[TestClient]:
    """The server as shipped: no archive allowed."""
    yield from _client(settings)


@pytest.fixture()
def archive_settings(tmp_path: Path, redis_url: str, shell_models_dir: Path, orthanc: Orthanc) -> Settings:
    return make_settings(tmp_path, redis_url, shell_models_dir, dicomweb_auth=f"basic:{USER}:{PASSWORD}",
                         dicomweb_allowed_urls=f"{orthanc.dicomweb},http://127.0.0.1:{free_port()}/dicom-web")


@pytest.fixture()
def archive_client(archive_settings: Settings) -> Iterator[TestClient]:
    yield from _client(archive_settings)


def _ref(url: str, study: str = UID, series: str = UID) -> dict[str, object]:
    return {"dicomweb": {"url": url, "study_uid": study, "series_uid": series}}


def _leftovers(settings: Settings) -> list[str]:
    root = settings.slides_dir
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_openapi_shows_the_reference_and_the_dicom_routes(closed_client: TestClient) -> None:
    doc = closed_client.get("/openapi.json").json()
    assert {"get"} <= set(doc["paths"]["/v1/jobs/{job_id}/dicom"])
    assert "application/zip" in doc["paths"]["/v1/jobs/{job_id}/dicom"]["get"]["responses"]["200"]["content"]
    assert {"post"} <= set(doc["paths"]["/v1/jobs/{job_id}/dicom/store"])
    ref = doc["components"]["schemas"]["DicomwebRefIn"]
    assert set(ref["required"]) == {"url", "study_uid", "series_uid"}
    assert "dicomweb" in doc["components"]["schemas"]["JobCreate"]["properties"]


def test_an_archive_not_allowed_is_refused_before_any_request(closed_client: TestClient, settings: Settings) -> None:
    resp = closed_client.post("/v1/jobs", json=_ref("http://127.0.0.1:1/dicom-web"))
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"] == "Forbidden"
    assert "PIXELCAM_DICOMWEB_ALLOWED_URLS" in resp.json()["detail"] and "none" in resp.json()["detail"]
    assert _leftovers(settings) == []


@pytest.mark.parametrize(("body", "words"), [
    ({}, "exactly one of slide_id"),
    ({"slide_id": "0" * 64, **_ref("http://pacs/dicom-web")}, "exactly one of slide_id"),
    ({"dicomweb": {"url": "http://pacs/dicom-web", "study_uid": UID}}, "dicomweb.series_uid: Field required"),
    ({"dicomweb": {"study_uid": UID, "series_uid": UID}}, "dicomweb.url: Field required"),
    (_ref("http://pacs/dicom-web", study="1.2.abc"), "dicomweb.study_uid: String should match pattern"),
    (_ref("ftp://pacs/dicom-web"), "dicomweb.url: String should match pattern"),
    ({"dicomweb": {"url": "http://pacs/dicom-web", "study_uid": UID, "series_uid": UID, "token": "x"}},
     "Extra inputs are not permitted"),
])
def test_malformed_references_are_422(closed_client: TestClient, body: dict[str, object], words: str) -> None:
    resp = closed_client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    assert words in resp.json()["detail"], resp.json()


def test_archive_urls_that_are_not_allowed_or_carry_credentials(archive_client: TestClient, orthanc: Orthanc) -> None:
    host = orthanc.dicomweb.split("/dicom-web")[0]
    for url in (f"{host}/other", f"{host}/dicom-webx", orthanc.dicomweb.replace("127.0.0.1", "localhost"),
                orthanc.dicomweb.replace("http:", "https:")):
        resp = archive_client.post("/v1/jobs", json=_ref(url))
        assert resp.status_code == 403, (url, resp.text)
    resp = archive_client.post("/v1/jobs", json=_ref(orthanc.dicomweb.replace("//", f"//{USER}:{PASSWORD}@")))
    assert resp.status_code == 422 and "PIXELCAM_DICOMWEB_AUTH" in resp.json()["detail"]
    assert PASSWORD not in resp.text


def test_unknown_series_unreachable_archive_and_bad_credentials(archive_client: TestClient, orthanc: Orthanc,
                                                                archive_settings: Settings, tmp_path: Path,
                                                                redis_url: str, shell_models_dir: Path,
                                                                cmu_in_orthanc: DicomizedSlide) -> None:
    resp = archive_client.post("/v1/jobs", json=_ref(orthanc.dicomweb, cmu_in_orthanc.study_uid, UID))
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"] == "ArchiveNotFound" and UID in resp.json()["detail"]

    dead = archive_settings.dicomweb_allowed_list[1]  # allowed, but nothing listens there
    resp = archive_client.post("/v1/jobs", json=_ref(dead))
    assert resp.status_code == 502, resp.text
    assert "cannot be reached" in resp.json()["detail"] and dead in resp.json()["detail"]

    wrong = make_settings(tmp_path / "wrong", redis_url, shell_models_dir, dicomweb_allowed_urls=orthanc.dicomweb,
                          dicomweb_auth=f"basic:{USER}:not-the-password")
    with TestClient(create_app(wrong)) as client:
        resp = client.post("/v1/jobs", json=_ref(orthanc.dicomweb, cmu_in_orthanc.study_uid,
                                                 cmu_in_orthanc.series_uid))
    assert resp.status_code == 502 and "refused the server's credentials" in resp.json()["detail"], resp.text
    assert "not-the-password" not in resp.text
    assert _leftovers(archive_settings) == [] and _leftovers(wrong) == []


def test_a_slide_too_coarse_for_the_model_fails_with_the_reason_and_has_no_dicom(
        archive_client: TestClient, archive_settings: Settings, orthanc: Orthanc, slides_dir: Path) -> None:
    # the real CAMELYON16 DICOM level (28.97 um/px) stored in the archive, then named by its reference
    ds = pydicom.dcmread(slides_dir / "dicom_camelyon16_lowres" / "multiframe_camelyon_challenge_image.dcm")
    web = DICOMwebClient(orthanc.dicomweb)
    web._session.auth = (USER, PASSWORD)
    web.store_instances([ds])
    resp = archive_client.post("/v1/jobs", json=_ref(orthanc.dicomweb, ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    slide = archive_client.get(f"/v1/slides/{resp.json()['slide_id']}").json()
    assert slide["info"]["format"] == "dicom" and round(slide["info"]["mpp_x"], 2) == 28.97
    Worker(archive_settings, name="dicom-errors").run(burst=True)
    job = archive_client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "failed" and "coarser than the model" in job["error"], job
    resp = archive_client.get(f"/v1/jobs/{job_id}/dicom")
    assert resp.status_code == 409 and "failed" in resp.json()["detail"] and "coarser" in resp.json()["detail"]
    assert archive_client.post(f"/v1/jobs/{job_id}/dicom/store").status_code == 409


def test_dicom_of_unknown_or_unfinished_jobs_and_store_without_an_archive(
        closed_client: TestClient, slides_dir: Path) -> None:
    assert closed_client.get(f"/v1/jobs/{'0' * 32}/dicom").status_code == 404
    slide = closed_client.post("/v1/slides", content=(slides_dir / "CMU-1-Small-Region.svs").read_bytes(),
                               params={"filename": "cmu.svs"}).json()
    job = closed_client.post("/v1/jobs", json={"slide_id": slide["slide_id"]}).json()
    resp = closed_client.get(f"/v1/jobs/{job['job_id']}/dicom")
    assert resp.status_code == 409 and "queued" in resp.json()["detail"], resp.text
    resp = closed_client.post(f"/v1/jobs/{job['job_id']}/dicom/store", json={"url": "http://pacs/dicom-web"})
    assert resp.status_code == 409  # not done: nothing to send, whatever the target
    resp = closed_client.get(f"/v1/jobs/{job['job_id']}/dicom", params={"downsample": 0})
    assert resp.status_code == 422


def test_a_finished_upload_exports_a_new_study_and_store_needs_an_allowed_target(
        closed_client: TestClient, settings: Settings, slides_dir: Path) -> None:
    import io
    import zipfile

    slide = closed_client.post("/v1/slides", content=(slides_dir / "CMU-1-Small-Region.svs").read_bytes(),
                               params={"filename": "cmu.svs"}).json()
    job = closed_client.post("/v1/jobs", json={"slide_id": slide["slide_id"]}).json()
    Worker(settings, name="dicom-upload").run(burst=True)
    resp = closed_client.get(f"/v1/jobs/{job['job_id']}/dicom")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    assert resp.headers["x-pixelcam-new-study"] == "true"
    names = zipfile.ZipFile(io.BytesIO(resp.content)).namelist()
    assert sorted(names) == ["ann.dcm", "seg-0.dcm", "sr.dcm"]
    resp = closed_client.post(f"/v1/jobs/{job['job_id']}/dicom/store")
    assert resp.status_code == 409 and "PIXELCAM_DICOMWEB_STORE_URL" in resp.json()["detail"]
    resp = closed_client.post(f"/v1/jobs/{job['job_id']}/dicom/store", json={"url": "http://pacs/dicom-web"})
    assert resp.status_code == 403 and "PIXELCAM_DICOMWEB_ALLOWED_URLS" in resp.json()["detail"]
    assert not [p for p in (settings.jobs_dir / job["job_id"]).iterdir() if p.name.startswith(".dicom")]
