"""`/v1/slides`: streamed, hashed, validated uploads; the slide id is the SHA-256 of the bytes."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import SettingsDep, SlideStoreDep
from service.errors import InvalidUpload, UploadTooLarge
from service.schemas import ErrorPublic, SlidePublic
from service.settings import Settings
from service.store import SlideRecord, SlideStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/slides", tags=["slides"])

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorPublic}, 413: {"model": ErrorPublic}, 415: {"model": ErrorPublic}
}


async def receive_slide(request: Request, store: SlideStore, settings: Settings, filename: str | None) -> SlideRecord:
    """Stream the request body to disk while hashing it, within the size limit, then validate and store it."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        raise InvalidUpload(
            "send the slide as the raw request body, not as a form: "
            "curl --data-binary @slide.svs -H 'Content-Type: application/octet-stream' '.../v1/slides?filename=slide.svs'"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"upload of {declared} bytes exceeds the limit of {settings.max_upload_bytes} bytes; "
            "raise PIXELCAM_MAX_UPLOAD_BYTES on the server"
        )
    upload = store.begin_upload(filename, settings.max_upload_bytes)
    received = False
    try:
        async for data in request.stream():
            if data:
                upload.write(data)
        received = True
    finally:
        if not received:  # client gone, limit passed or cancelled: leave nothing behind
            upload.abort()
    return await run_in_threadpool(upload.commit)


def slide_public(record: SlideRecord) -> SlidePublic:
    """The API view of a stored slide."""
    return SlidePublic(slide_id=record.slide_id, filename=record.filename, size_bytes=record.size_bytes,
                       created=record.created, info=record.info,
                       links={"self": f"/v1/slides/{record.slide_id}"})


@router.post("", response_model=SlidePublic, status_code=201, responses=_ERRORS)
async def upload_slide(
    request: Request,
    response: Response,
    store: SlideStoreDep,
    settings: SettingsDep,
    filename: str | None = Query(None, description="original file name; only its extension is kept"),
) -> SlidePublic:
    """Upload a slide as the raw request body; a re-upload of the same bytes stores nothing."""
    record = await receive_slide(request, store, settings, filename)
    if not record.created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/slides/{record.slide_id}"
    return slide_public(record)


@router.get("/{slide_id}", response_model=SlidePublic, responses=_ERRORS)
def get_slide(slide_id: str, store: SlideStoreDep) -> SlidePublic:
    """A stored slide's info."""
    return slide_public(store.get(slide_id))
