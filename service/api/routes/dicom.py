"""DICOM in and out: a job's DICOMweb slide reference resolved to a stored slide, `GET /v1/jobs/{id}/dicom` (the
results as DICOM objects in a zip) and `POST /v1/jobs/{id}/dicom/store` (STOW-RS to an allowed archive)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pydicom
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset

from service import constants
from service.api.deps import QueueDep, SettingsDep, SlideStoreDep
from service.api.schemas import DicomStoreIn, DicomStorePublic, ErrorPublic, JobCreate, file_response
from service.api.security import grant_slide, principal_of
from service.errors import InvalidRequest, JobConflict, ResultNotReady
from service.jobs.dicomweb import DicomwebRef, import_series, store_datasets
from service.jobs.queue import JobQueue
from service.jobs.storage import SlideStore, job_dir
from service.outputs.dicom_results import (
    DicomExportError,
    build_dicom_results,
    default_downsample,
    source_from_files,
    stand_in_source,
    write_dicom_results,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["dicom"])

__all__ = ["router", "resolve_slide_reference", "dicom_export"]

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
                                            422: {"model": ErrorPublic}}
_STORE_ERRORS: dict[int | str, dict[str, Any]] = {**_ERRORS, 403: {"model": ErrorPublic},
                                                  502: {"model": ErrorPublic}}


def resolve_slide_reference(body: JobCreate, request: Request, queue: JobQueue, slides: SlideStore,
                            settings: Settings) -> JobCreate:
    """A request naming a DICOMweb series becomes one naming the stored slide it was imported as (the import
    runs once; the caller's key gets the slide as if it had uploaded it)."""
    if body.dicomweb is None:
        return body
    ref = DicomwebRef(body.dicomweb.url, body.dicomweb.study_uid, body.dicomweb.series_uid)
    record = import_series(ref, slides, settings)
    grant_slide(queue, principal_of(request), record.slide_id)
    return body.model_copy(update={"slide_id": record.slide_id, "dicomweb": None})


def _done_job(queue: JobQueue, settings: Settings, job_id: str) -> tuple[dict[str, str], Path]:
    record = queue.get(job_id)
    if record["state"] != constants.STATE_DONE:
        reason = f": {record['error']}" if record.get("error") else ""
        raise ResultNotReady(f"job {job_id} is {record['state']}{reason}; its DICOM results exist once it is done "
                             f"(GET /v1/jobs/{job_id})")
    folder = job_dir(settings.jobs_dir, job_id)
    if not (folder / "result.json").is_file():
        raise ResultNotReady(f"job {job_id} is done but its files are missing from the shared storage; resubmit it")
    return record, folder


def _source(slides: SlideStore, slide_id: str) -> tuple[Dataset, bool]:
    """The slide's level-0 DICOM header, or a stand-in in a new study for a slide that is not DICOM."""
    slide = slides.get(slide_id)
    if slide.info.get("format") == "dicom":
        return source_from_files(sorted(slide.path.parent.glob("*.dcm"))), False
    return stand_in_source(l0_size_wh=tuple(slide.info["l0_size_wh"]),  # type: ignore[arg-type]
                           mpp_xy=(float(slide.info.get("mpp_x") or 1.0), float(slide.info.get("mpp_y") or 1.0)),
                           slide_sha256=slide.slide_id, slide_name=slide.filename), True


def dicom_export(queue: JobQueue, settings: Settings, slides: SlideStore, job_id: str,
                 downsample: int | None) -> tuple[list[Path], bool]:
    """The job's DICOM files (made once per downsample, kept with the job's files) and whether they start a new
    study. Written into a temporary folder and renamed into place: never a half-written set."""
    record, folder = _done_job(queue, settings, job_id)
    hm_downsample = float(json.loads((folder / "result.json").read_text())["heatmap"]["hm_downsample"])
    factor = downsample or default_downsample(hm_downsample)
    target = folder / f"dicom-{factor}"
    source, new_study = _source(slides, record["slide_id"])
    if not target.is_dir():
        tmp = folder / f".dicom-{factor}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            results = build_dicom_results(folder, source, seed=f"{job_id}:{factor}", downsample=factor,
                                          new_study=new_study)
            write_dicom_results(results, tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not a twin request that finished first
                    raise
        except DicomExportError as err:
            raise InvalidRequest(str(err)) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(target.glob("*.dcm")), new_study


@router.get("/dicom", responses={**_ERRORS, **file_response(
    "the results as DICOM files in a zip: seg-<level>.dcm (Segmentation pyramid), ann.dcm (Microscopy Bulk "
    "Simple Annotations), sr.dcm (Comprehensive SR)", "application/zip")}, response_class=Response)
def get_dicom(job_id: str, queue: QueueDep, settings: SettingsDep, slides: SlideStoreDep,
              downsample: int | None = Query(None, ge=1, le=1024, description=(
                  "level-0 pixels per pixel of the segmentation's base level; default the largest power of 2 "
                  "within a heatmap cell"))) -> Response:
    """A finished job's results as DICOM objects that reference the slide's study, series and frame of reference
    (a new study and frame for a slide that is not DICOM; header `X-Pixelcam-New-Study`): the foreground map as a
    FRACTIONAL Segmentation (tiled, multi-resolution), the positive regions as Microscopy Bulk Simple
    Annotations with their measurements, the slide call as a Structured Report. Details: docs/dicom.md."""
    paths, new_study = dicom_export(queue, settings, slides, job_id, downsample)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in paths:
            zf.write(path, path.name)
    return Response(buffer.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"',
                             "X-Pixelcam-New-Study": "true" if new_study else "false"})


@router.post("/dicom/store", response_model=DicomStorePublic, responses=_STORE_ERRORS)
def store_dicom(job_id: str, queue: QueueDep, settings: SettingsDep, slides: SlideStoreDep,
                body: DicomStoreIn | None = None) -> DicomStorePublic:
    """Send the job's DICOM objects to a DICOMweb archive with STOW-RS: the one named, else the archive the slide
    came from, else PIXELCAM_DICOMWEB_STORE_URL; it must be allowed (PIXELCAM_DICOMWEB_ALLOWED_URLS). Storing
    again sends the same SOP instances (their UIDs derive from the job)."""
    body = body or DicomStoreIn()
    record, _ = _done_job(queue, settings, job_id)
    origin = (slides.get(record["slide_id"]).info.get("dicomweb") or {}).get("url")
    url = body.url or origin or settings.dicomweb_store_url
    if not url:
        raise JobConflict(f"job {job_id}'s slide did not come from a DICOMweb archive and the server has no "
                          "PIXELCAM_DICOMWEB_STORE_URL; name the archive: {\"url\": \"http://pacs/dicom-web\"}")
    paths, new_study = dicom_export(queue, settings, slides, job_id, body.downsample)
    datasets = [pydicom.dcmread(path) for path in paths]
    answer = store_datasets(url, datasets, settings)
    series: dict[str, str] = {}
    for ds in datasets:
        kind = {"SEG": "segmentation", "ANN": "annotations", "SR": "report"}.get(str(ds.Modality), str(ds.Modality))
        series[kind] = str(ds.SeriesInstanceUID)
    logger.info("job %s: %d DICOM object(s) stored to %s", job_id, len(answer["stored"]), answer["url"])
    return DicomStorePublic(url=answer["url"], study_uid=str(datasets[0].StudyInstanceUID), new_study=new_study,
                            stored=answer["stored"], series=series)
