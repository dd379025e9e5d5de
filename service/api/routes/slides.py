"""`/v1/slides`: streamed, hashed, validated uploads; the slide id is the SHA-256 of the bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request, Response
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from service.api.deps import QueueDep, SettingsDep, SlideStoreDep
from service.api.schemas import ErrorPublic, SlidePublic
from service.api.security import grant_slide, principal_of
from service.errors import InvalidUpload, UploadTimeout, UploadTooLarge
from service.jobs.storage import SlideRecord, SlideStore, Upload
from service.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/slides", tags=["slides"])

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorPublic}, 408: {"model": ErrorPublic}, 413: {"model": ErrorPublic},
    415: {"model": ErrorPublic},
}


async def body_chunks(request: Request, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; UploadTimeout when the client sends nothing for `idle_timeout_s`."""
    stream = request.stream().__aiter__()
    while True:
        try:
            data = await asyncio.wait_for(stream.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError as err:
            raise UploadTimeout(
                f"the upload sent nothing for {idle_timeout_s:g} s and was dropped; resend it "
                "(the server's limit is PIXELCAM_UPLOAD_IDLE_TIMEOUT_S)"
            ) from err
        yield data


class _FormSlide:
    """A multipart/form-data body fed chunk by chunk: its first file part streams into the slide store."""

    def __init__(self, store: SlideStore, max_bytes: int, boundary: bytes) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.upload: Upload | None = None
        self._in_file = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda d, a, b: self._field.extend(d[a:b]),
            "on_header_value": lambda d, a, b: self._value.extend(d[a:b]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if self.upload is None and b"filename" in params:
            self.upload = self.store.begin_upload(params[b"filename"].decode(errors="replace"), self.max_bytes)
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and self.upload is not None:
            self.upload.write(data[start:end])

    def _part_end(self) -> None:
        self._in_file = False


async def _receive_form(request: Request, store: SlideStore, settings: Settings) -> Upload:
    """The first file of a form upload (`curl -F file=@slide.svs`), streamed to disk while hashing."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    if not params.get(b"boundary"):
        raise InvalidUpload("multipart upload without a boundary; let the client build the form (curl -F)")
    form = _FormSlide(store, settings.max_upload_bytes, params[b"boundary"])
    received = False
    try:
        async for data in body_chunks(request, settings.upload_idle_timeout_s):
            form.parser.write(data)
        form.parser.finalize()
        received = True
    except FormParserError as err:
        raise InvalidUpload(f"the form upload is malformed: {err}") from err
    finally:
        if not received and form.upload is not None:  # leave nothing behind
            form.upload.abort()
    if form.upload is None:
        raise InvalidUpload("the form has no file part; send the slide as a file: curl -F file=@slide.svs ...")
    return form.upload


async def _receive_body(request: Request, store: SlideStore, settings: Settings, filename: str | None) -> Upload:
    """The raw request body, streamed to disk while hashing."""
    upload = store.begin_upload(filename, settings.max_upload_bytes)
    received = False
    try:
        async for data in body_chunks(request, settings.upload_idle_timeout_s):
            if data:
                upload.write(data)
        received = True
    finally:
        if not received:  # client gone, limit passed or cancelled: leave nothing behind
            upload.abort()
    return upload


async def receive_slide(request: Request, store: SlideStore, settings: Settings, filename: str | None) -> SlideRecord:
    """Stream the upload (raw body or form file) to disk while hashing it, within the limit; validate; store."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"upload of {declared} bytes exceeds the limit of {settings.max_upload_bytes} bytes; "
            "raise PIXELCAM_MAX_UPLOAD_BYTES on the server"
        )
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload = await _receive_form(request, store, settings)
    else:
        upload = await _receive_body(request, store, settings, filename)
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
    queue: QueueDep,
    filename: str | None = Query(None, description="original file name; only its extension is kept"),
) -> SlidePublic:
    """Upload a slide as the raw request body; a re-upload of the same bytes stores nothing."""
    record = await receive_slide(request, store, settings, filename)
    await run_in_threadpool(grant_slide, queue, principal_of(request), record.slide_id)
    if not record.created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/slides/{record.slide_id}"
    return slide_public(record)


@router.get("/{slide_id}", response_model=SlidePublic, responses=_ERRORS)
def get_slide(slide_id: str, store: SlideStoreDep) -> SlidePublic:
    """A stored slide's info."""
    return slide_public(store.get(slide_id))
