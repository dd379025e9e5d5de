"""`/v1/jobs/{id}/result|geojson|heatmap.png|heatmap.tif|heatmap-slide.tif|report`: the files of a finished job."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from service import constants
from service.analysis.html_report import REPORT_FILE, write_html_report
from service.api.deps import QueueDep, SettingsDep, SlideStoreDep
from service.api.schemas import ErrorPublic, file_response
from service.errors import InvalidRequest, ResultNotReady
from service.jobs.queue import JobQueue
from service.jobs.storage import job_dir
from service.outputs.slide_frame import LIKELIHOOD, SlideFrameError, write_slide_frame_heatmap
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["results"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}}


def _result_file(queue: JobQueue, settings: Settings, job_id: str, *names: str) -> tuple[Path, dict[str, str]]:
    """The first of `names` in a finished job's folder; ResultNotReady while the job is not done."""
    record = queue.get(job_id)
    if record["state"] != constants.STATE_DONE:
        reason = f": {record['error']}" if record.get("error") else ""
        raise ResultNotReady(
            f"job {job_id} is {record['state']}{reason}; results exist once it is done (GET /v1/jobs/{job_id})"
        )
    folder = job_dir(settings.jobs_dir, job_id)
    for name in names:
        if (folder / name).is_file():
            return folder / name, record
    raise ResultNotReady(f"job {job_id} is done but {names[0]} is missing from the shared storage; resubmit it")


@router.get("/result", responses=_ERRORS)
def get_result(job_id: str, queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Slide class, probability, evidence and provenance (the model that made it included)."""
    path, record = _result_file(queue, settings, job_id, "result.json")
    result = json.loads(path.read_text())
    result["job"] = {"job_id": job_id, "slide_id": record["slide_id"], "model": record.get("model"),
                     "model_sha256": record.get("model_sha256"), "options": json.loads(record.get("options") or "{}"),
                     "mpp": record.get("mpp") or None}
    return JSONResponse(result)


@router.get("/geojson", responses={**_ERRORS, **file_response(
    "QuPath GeoJSON (a FeatureCollection); gzip with ?download=true", "application/geo+json", "application/gzip")},
    response_class=Response)
def get_geojson(
    job_id: str,
    request: Request,
    queue: QueueDep,
    settings: SettingsDep,
    download: bool = Query(False, description="as a .geojson.gz file (gzip body) instead of JSON"),
) -> Response:
    """QuPath-ready GeoJSON in level-0 pixels; gzip-encoded when the client accepts it or asks to download."""
    path, _ = _result_file(queue, settings, job_id, "result.geojson")
    data = path.read_bytes()
    if download:
        return Response(gzip.compress(data), media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.geojson.gz"'})
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(gzip.compress(data), media_type="application/geo+json",
                        headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return Response(data, media_type="application/geo+json", headers={"Vary": "Accept-Encoding"})


@router.get("/heatmap.png", responses={**_ERRORS, **file_response("the heatmap over a slide thumbnail", "image/png")},
            response_class=FileResponse)
def get_heatmap_png(job_id: str, queue: QueueDep, settings: SettingsDep) -> FileResponse:
    """The heatmap over a thumbnail of the slide (PNG)."""
    path, _ = _result_file(queue, settings, job_id, "heatmap.png", "overlay.png")
    return FileResponse(path, media_type="image/png")


@router.get("/heatmap.tif", responses={**_ERRORS, **file_response("the pyramidal heatmap TIFF", "image/tiff")},
            response_class=FileResponse)
def get_heatmap_tif(job_id: str, queue: QueueDep, settings: SettingsDep) -> FileResponse:
    """The slide-level probability heatmap as a tiled pyramidal TIFF."""
    path, _ = _result_file(queue, settings, job_id, "heatmap.tif")
    return FileResponse(path, media_type="image/tiff", filename=f"{job_id}-heatmap.tif")


@router.get("/heatmap-slide.tif", responses={**_ERRORS, 422: {"model": ErrorPublic}, **file_response(
    "the heatmap as a pyramidal TIFF in the slide's level-0 frame (QuPath, ASAP)", "image/tiff")},
    response_class=FileResponse)
def get_heatmap_slide_frame(
    job_id: str,
    queue: QueueDep,
    settings: SettingsDep,
    colormap: str = Query("turbo", description=f"a colour map (RGBA, alpha = analysed) or {LIKELIHOOD!r} (one "
                                               "uint8 channel: 0 not analysed, 1..255 the probability)"),
    downsample: int | None = Query(None, ge=1, le=1024, description="level-0 pixels per pixel of the base level "
                                   "(1: the slide's own size); default the largest power of 2 within a cell"),
    opacity: float = Query(0.6, ge=0, le=1, description="alpha of analysed pixels (colour maps)"),
) -> FileResponse:
    """The heatmap laid exactly over the slide: base level = the slide's level 0 / `downsample`, with resolution
    tags, so ASAP's overlay and the shipped QuPath script place it (docs/analysis.md). Made once per parameter set
    and kept with the job's files."""
    heatmap, _ = _result_file(queue, settings, job_id, "heatmap.tif")
    result = json.loads((heatmap.parent / "result.json").read_text())
    hm = result["heatmap"]
    name = f"heatmap-slide-{colormap}-{downsample or 'auto'}-{round(opacity * 100)}.tif"
    path = heatmap.parent / name
    if not path.is_file():
        try:
            write_slide_frame_heatmap(heatmap, path, l0_size_wh=tuple(hm["l0_size_wh"]),
                                      hm_downsample=float(hm["hm_downsample"]),
                                      l0_mpp=float(result["provenance"]["slide"]["mpp_x"]), colormap=colormap,
                                      downsample=downsample, opacity=opacity)
        except SlideFrameError as err:
            raise InvalidRequest(str(err)) from err
    return FileResponse(path, media_type="image/tiff", filename=f"{job_id}-heatmap-slide.tif")


@router.get("/report", responses={**_ERRORS, **file_response("the slide report, one self-contained HTML page",
                                                             "text/html")}, response_class=HTMLResponse)
def get_report(job_id: str, queue: QueueDep, settings: SettingsDep, slides: SlideStoreDep) -> FileResponse:
    """A report a pathologist can read: thumbnail and overlay, the call and why, the evidence with the largest
    regions, the model and its card's numbers, provenance and caveats. Made once and kept with the job's files;
    nothing in it is fetched from elsewhere."""
    result, record = _result_file(queue, settings, job_id, "result.json")
    path = result.parent / REPORT_FILE
    if not path.is_file():
        options = json.loads(record.get("options") or "{}")
        mpp = options.get("mpp_override") or (float(record["mpp"]) if record.get("mpp") else None)
        write_html_report(result.parent, slides.get(record["slide_id"]).path, mpp_override=mpp)
    return FileResponse(path, media_type="text/html; charset=utf-8")
