"""`/healthz` (the process answers), `/readyz` (Redis, storage and a default model are usable), `/metrics`."""

from __future__ import annotations

import logging
import os

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import ModelsDep, QueueDep, SettingsDep, TrainingQueueDep
from service.api.schemas import HealthPublic, file_response
from service.errors import ServiceError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """Liveness: the API process answers."""
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(queue: QueueDep, models: ModelsDep, settings: SettingsDep, training: TrainingQueueDep) -> JSONResponse:
    """Readiness: Redis answers, the storage is writable and the default model is valid."""
    checks: dict[str, str] = {}
    try:
        queue.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as err:
        checks["redis"] = f"unreachable: {err}"
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    checks["storage"] = "ok" if os.access(settings.storage_dir, os.W_OK) else f"{settings.storage_dir} not writable"
    try:
        checks["model"] = f"ok ({models.get(None).name})"
    except ServiceError as err:
        checks["model"] = str(err)
    ready = all(v.startswith("ok") for v in checks.values())
    if checks["redis"] == "ok":  # informational: with no worker alive jobs are accepted and wait in the queue
        checks["workers"] = f"{queue.alive_workers()} alive"
        checks["trainers"] = f"{training.alive_trainers()} alive"
    body = HealthPublic(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses=file_response("Prometheus text exposition", "text/plain; version=0.0.4"))
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by state, tiles/s, queue depth, batch fill, inference latency."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
