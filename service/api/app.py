"""`create_app(settings)`: the FastAPI application, its lifespan and the one place that maps errors to statuses."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.api.metrics import HttpMetrics, QueueCollector, http_histogram
from service.api.routes import dicom, health, jobs, models, results, slides, tiles, training, viewer
from service.api.security import SecurityMiddleware, authorize, install_log_redaction, is_open_path
from service.jobs.queue import JobQueue, connect
from service.jobs.storage import ModelRegistry, SlideStore
from service.jobs.training_queue import TrainingQueue
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["create_app", "packaged_models"]

_STATUS: list[tuple[type[errors.ServiceError], int]] = [
    (errors.NotFoundError, 404),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.RateLimited, 429),
    (errors.UploadTimeout, 408),
    (errors.JobLost, 410),
    (errors.UploadTooLarge, 413),
    (errors.InvalidUpload, 415),
    (errors.InvalidRequest, 422),
    (errors.ModelUnavailable, 409),
    (errors.JobConflict, 409),
    (errors.ResultNotReady, 409),
    (errors.QueueUnavailable, 503),
    (errors.ArchiveUnavailable, 502),
]


def packaged_models() -> list[Path]:
    """The demo model(s) shipped inside the `model` package (`model/weights/*.onnx`)."""
    try:
        weights = resources.files("model") / "weights"
        return sorted(Path(str(p)) for p in weights.iterdir() if p.name.endswith(".onnx"))
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        return []


def status_of(err: errors.ServiceError) -> int:
    """The HTTP status of a domain error."""
    return next((code for cls, code in _STATUS if isinstance(err, cls)), 400)


_LONG_WORD = re.compile(r"\S{161,}")
_MAX_DETAIL = 2000


def bounded_detail(text: str) -> str:
    """An error detail fit to echo: a long value from the request is cut to its start, the whole to 2000 chars."""
    text = _LONG_WORD.sub(lambda m: f"{m.group(0)[:80]}...[{len(m.group(0)) - 80} characters cut]", text)
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + f"...[{len(text) - _MAX_DETAIL} characters cut]"


def create_app(settings: Settings) -> FastAPI:
    """The API; Redis must be reachable at `settings.redis_url` when the app starts."""
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise errors.QueueUnavailable(
                "the API needs PIXELCAM_REDIS_URL; `pixelcam serve` sets it (starting a private Redis when empty)"
            )
        client = connect(settings.redis_url, socket_timeout_s=settings.redis_timeout_s)
        queue = JobQueue(client, settings)
        queue.ensure_group()
        registry = ModelRegistry(settings.models_dir, settings.default_model)
        if settings.models_dir_override is None:
            seeded = registry.seed(packaged_models())
            if seeded:
                logger.info("models dir %s seeded with %s", settings.models_dir, ", ".join(seeded))
        app.state.settings = settings
        app.state.queue = queue
        app.state.training = TrainingQueue(client, settings)
        app.state.training.ensure_group()
        app.state.slides = SlideStore(settings.slides_dir, settings.inspect_timeout_s,
                                       settings.inspect_memory_mb << 20)
        app.state.models = registry
        app.state.metrics = QueueCollector(queue)
        app.state.metrics.registry.register(app.state.http_histogram)
        logger.info("api ready (storage %s, redis prefix %s)", settings.storage_dir, settings.redis_prefix)
        stop = threading.Event()
        sweeper = None
        if settings.retention_days > 0:
            sweeper = threading.Thread(target=_retention_loop, args=(app, stop), name="pixelcam-retention",
                                       daemon=True)
            sweeper.start()
        try:
            yield
        finally:
            stop.set()
            if sweeper is not None:
                sweeper.join(timeout=10)
            client.close()

    app = FastAPI(
        title="pixelcam",
        summary="PixelCAM whole-slide inference: slide class, heatmap and QuPath GeoJSON",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs is served by the viewer router with local Swagger UI assets (no CDN)
        redoc_url=None,
        dependencies=[Depends(authorize)],  # ids in the path must belong to the caller's key
    )
    app.state.settings = settings
    app.state.http_histogram = http_histogram()
    # the outermost layer last: CORS answers preflights before the key check, which runs before any route
    app.add_middleware(SecurityMiddleware, settings=settings)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_credentials=True,
                           allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Location", "Retry-After", "ETag"])
    app.add_middleware(HttpMetrics, histogram=app.state.http_histogram)  # outermost: every answer is timed

    _add_error_handlers(app)

    # tiles first: `/v1/slides/{id}.dzi` would otherwise match `/v1/slides/{slide_id}`
    for router in (tiles.router, viewer.router, slides.router, jobs.router, results.router, dicom.router,
                   models.router, training.router, health.router):
        app.include_router(router)
    _document_security(app, keys_required=bool(settings.api_key_list))
    return app


def _retention_loop(app: FastAPI, stop: threading.Event) -> None:
    """Delete expired jobs and slides every `retention_sweep_s` until the app stops (errors are logged)."""
    settings: Settings = app.state.settings
    while not stop.wait(settings.retention_sweep_s):
        try:
            jobs.sweep_expired(app.state.queue, settings, app.state.slides, getattr(app.state, "tiles", None),
                               training=app.state.training)
        except Exception:
            logger.exception("retention sweep failed; trying again in %g s", settings.retention_sweep_s)


def _document_security(app: FastAPI, keys_required: bool) -> None:
    """Declare the Bearer keys in the OpenAPI document: required on every guarded route when keys are set
    (optional otherwise), none on the open ones (health, metrics, static files)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "one of PIXELCAM_API_KEYS (the viewer may pass it once as ?api_key=); "
                           "not needed when the server runs without keys"}}
        schema["security"] = [{"bearer": []}] if keys_required else [{}, {"bearer": []}]
        for path, operations in schema.get("paths", {}).items():
            if is_open_path(path):
                for operation in operations.values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    """The one place that turns errors into JSON responses (never a stack trace)."""

    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, err: errors.ServiceError) -> JSONResponse:
        headers: dict[str, str] = {}
        if isinstance(err, errors.RateLimited):
            headers["Retry-After"] = str(max(1, int(err.retry_after_s + 0.999)))
        if isinstance(err, errors.Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": type(err).__name__, "detail": bounded_detail(str(err))},
                            status_code=status_of(err),
                            headers=headers)

    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, err: redis.RedisError) -> JSONResponse:
        logger.error("redis error on %s %s: %s", request.method, request.url.path, err)
        return JSONResponse({"error": "QueueUnavailable",
                             "detail": "the job queue (Redis) is unreachable; retry shortly, and check "
                                       "PIXELCAM_REDIS_URL and the Redis server if it persists"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        logger.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=err)
        return JSONResponse({"error": "InternalError",
                             "detail": f"unexpected server error; the server log has it under id {error_id} "
                                       "(quote it when reporting the problem)", "error_id": error_id},
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        name = "NotFound" if err.status_code == 404 else "HTTPError"
        detail = str(err.detail)
        if err.status_code == 400 and "parsing the body" in detail:  # FastAPI's words for undecodable bytes
            name, detail = "InvalidBody", ("the request body could not be decoded; send a UTF-8 JSON object with "
                                           "Content-Type: application/json")
        return JSONResponse({"error": name, "detail": bounded_detail(detail)}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return JSONResponse({"error": "ValidationError", "detail": bounded_detail("; ".join(parts))}, status_code=422)
