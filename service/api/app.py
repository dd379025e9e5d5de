"""`create_app(settings)`: the FastAPI application, its lifespan and the one place that maps errors to statuses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.api import tiles, viewer  # Deep Zoom tiles and the built-in viewer (viewer engineer)
from service.api.metrics import QueueCollector
from service.api.routes import health, jobs, models, results, slides
from service.queue import JobQueue, connect
from service.settings import Settings
from service.store import ModelRegistry, SlideStore

logger = logging.getLogger(__name__)

__all__ = ["create_app", "packaged_models"]

_STATUS: list[tuple[type[errors.ServiceError], int]] = [
    (errors.NotFoundError, 404),
    (errors.UploadTooLarge, 413),
    (errors.InvalidUpload, 415),
    (errors.InvalidRequest, 422),
    (errors.ModelUnavailable, 409),
    (errors.JobConflict, 409),
    (errors.ResultNotReady, 409),
    (errors.QueueUnavailable, 503),
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


def create_app(settings: Settings) -> FastAPI:
    """The API; Redis must be reachable at `settings.redis_url` when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise errors.QueueUnavailable(
                "the API needs PIXELCAM_REDIS_URL; `pixelcam serve` sets it (starting a private Redis when empty)"
            )
        client = connect(settings.redis_url)
        queue = JobQueue(client, settings)
        queue.ensure_group()
        registry = ModelRegistry(settings.models_dir, settings.default_model)
        if settings.models_dir_override is None:
            seeded = registry.seed(packaged_models())
            if seeded:
                logger.info("models dir %s seeded with %s", settings.models_dir, ", ".join(seeded))
        app.state.settings = settings
        app.state.queue = queue
        app.state.slides = SlideStore(settings.slides_dir)
        app.state.models = registry
        app.state.metrics = QueueCollector(queue)
        logger.info("api ready (storage %s, redis prefix %s)", settings.storage_dir, settings.redis_prefix)
        try:
            yield
        finally:
            client.close()

    app = FastAPI(
        title="pixelcam",
        summary="PixelCAM whole-slide inference: slide class, heatmap and QuPath GeoJSON",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(errors.ServiceError)
    async def _service_error(request: Request, err: errors.ServiceError) -> JSONResponse:
        return JSONResponse({"error": type(err).__name__, "detail": str(err)}, status_code=status_of(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        name = "NotFound" if err.status_code == 404 else "HTTPError"
        return JSONResponse({"error": name, "detail": str(err.detail)}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return JSONResponse({"error": "ValidationError", "detail": "; ".join(parts)}, status_code=422)

    # tiles first: `/v1/slides/{id}.dzi` would otherwise match `/v1/slides/{slide_id}`
    for router in (tiles.router, viewer.router, slides.router, jobs.router, results.router, models.router,
                   health.router):
        app.include_router(router)
    return app
