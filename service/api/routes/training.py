"""`/v1/training-jobs`: train a model on uploaded slides; state, progress events, cancel, list, delete.

A job is checked whole at submit (slides, labels, annotations, config: a 4xx with the reason, nothing queued) and
written to its folder on the storage; a trainer (`pixelcam trainer`, or the one `pixelcam serve` starts when torch
is installed) runs it and registers the model it exports under the job's `name`. Creating a job needs an admin key
(it adds a model); with API keys each key sees only its own training jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import constants
from service.api.deps import ModelsDep, QueueDep, SettingsDep, SlideStoreDep, TrainingQueueDep
from service.api.schemas import (
    ErrorPublic,
    TrainingJobCreate,
    TrainingJobPublic,
    TrainingJobsPublic,
    file_response,
)
from service.api.security import owns_slide, principal_of
from service.errors import Forbidden, InvalidRequest, JobConflict
from service.jobs.storage import ModelRegistry
from service.jobs.training_queue import TrainingJobNotFound, TrainingQueue, loads_json, sweep_dead_trainers
from service.jobs.training_request import (
    TrainingSlide,
    check_request,
    remove_training_files,
    write_job_folder,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/training-jobs", tags=["training"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorPublic}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
    422: {"model": ErrorPublic},
}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None


def training_public(record: dict[str, str], trainers_alive: int | None = None) -> TrainingJobPublic:
    """The API view of a training job's hash."""
    training_id = record["training_id"]
    state = record["state"]
    base = f"/v1/training-jobs/{training_id}"
    links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
    model = record.get("model") or None
    if state == constants.STATE_DONE and model:
        links.update(model=f"/v1/models/{model}", analyze="/v1/jobs")
    message = record.get("message") or None
    if state == constants.STATE_QUEUED and trainers_alive == 0:
        message = ("waiting for a trainer: none is running; start one with `pixelcam trainer` (needs the train "
                   "extra, torch) where it sees this storage and Redis")
    elif state == constants.STATE_QUEUED:
        message = "waiting for a trainer"
    stages = loads_json(record.get("stages"), [])
    return TrainingJobPublic(
        id=training_id, name=record.get("name", ""), state=state, stage=record.get("stage") or None,
        stages=[str(s) for s in stages] if isinstance(stages, list) else [],
        stage_index=_int(record.get("stage_index")), epoch=_int(record.get("epoch")),
        epochs=_int(record.get("epochs")),
        progress=1.0 if state == constants.STATE_DONE else min(1.0, max(0.0, _float(record.get("progress")) or 0.0)),
        metrics=loads_json(record.get("metrics"), {}), message=message, error=record.get("error") or None,
        model=model if state == constants.STATE_DONE else None,
        model_sha256=(record.get("model_sha256") or None) if state == constants.STATE_DONE else None,
        evaluation=loads_json(record.get("evaluation"), None), slides=_int(record.get("slides")) or 0,
        classes=loads_json(record.get("classes"), {}), config=loads_json(record.get("config"), {}),
        trainer=record.get("trainer") or None, created_at=_float(record.get("created_at")) or 0.0,
        started_at=_float(record.get("started_at")), finished_at=_float(record.get("finished_at")), links=links,
    )


def _owned(tq: TrainingQueue, models: ModelRegistry, request: Request, training_id: str) -> dict[str, str]:
    """The caller's training job (another key's answers 404, like one that does not exist), its lease checked:
    a running job whose trainer died is failed here with the reason."""
    record = tq.get(training_id)
    who = principal_of(request)
    if who.authenticated and record.get("owner") != who.key_id:
        raise TrainingJobNotFound(f"no training job {training_id!r}; list yours with GET /v1/training-jobs")
    if record["state"] == constants.STATE_RUNNING and sweep_dead_trainers(tq, models, [training_id]):
        record = tq.get(training_id)
    return record


@router.post("", response_model=TrainingJobPublic, status_code=202, responses=_ERRORS)
def create_training_job(body: TrainingJobCreate, request: Request, response: Response, tq: TrainingQueueDep,
                        queue: QueueDep, slides: SlideStoreDep, models: ModelsDep,
                        settings: SettingsDep) -> TrainingJobPublic:
    """Train a model on uploaded slides (an admin key when keys are configured); 202 with the job's `id`."""
    who = principal_of(request)
    if not who.admin:
        raise Forbidden("creating training jobs needs a key listed in PIXELCAM_ADMIN_KEYS (a training job adds a "
                        "model to the server); ask the server's operator")
    training_id = uuid.uuid4().hex
    name = body.name or f"trained-{training_id[:12]}"
    items = [TrainingSlide(s.slide_id, s.label, s.annotations, s.mpp) for s in body.slides]
    config = body.config.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
    checked = check_request(items, config, name, slides, lambda slide_id: owns_slide(queue, who, slide_id))
    if (models.root / f"{name}.onnx").exists():
        raise JobConflict(f"a model named {name!r} exists already; give the training job another \"name\"")
    if not tq.reserve_name(name, training_id):
        raise JobConflict(f"another unfinished training job will register a model named {name!r}; give this one "
                          "another \"name\"")
    classes = {c: sum(1 for s in items if s.label == c) for c in checked.resolved.get("class_names", [])}
    try:
        write_job_folder(settings.training_dir, training_id, checked)
        fields = {"name": name, "slides": str(len(items)), "classes": json.dumps(classes),
                  "config": json.dumps(config), "slide_ids": ",".join(s.slide_id for s in items)}
        record = tq.submit(training_id, fields, who.key_id)
    except BaseException:
        tq.release_name(name, training_id)
        remove_training_files(settings.training_dir, training_id)
        raise
    response.headers["Location"] = f"/v1/training-jobs/{training_id}"
    return training_public(record, tq.alive_trainers())


@router.get("", response_model=TrainingJobsPublic, responses=_ERRORS)
def list_training_jobs(request: Request, tq: TrainingQueueDep, models: ModelsDep,
                       limit: int = Query(50, ge=1, le=1000),
                       state: str | None = Query(None, description="only jobs in this state")) -> TrainingJobsPublic:
    """Recent training jobs (the caller's when keys are configured), newest first."""
    if state is not None and state not in constants.TRAINING_STATES:
        raise InvalidRequest(f"unknown state {state!r}; use one of {', '.join(constants.TRAINING_STATES)}")
    who = principal_of(request)
    ids = tq.list_ids(who.key_id if who.authenticated else None, limit if state is None else 10 * limit)
    records = tq.records(ids)
    running = [r["training_id"] for r in records if r["state"] == constants.STATE_RUNNING]
    if running and sweep_dead_trainers(tq, models, running):
        records = tq.records(ids)
    alive = tq.alive_trainers()
    return TrainingJobsPublic(training_jobs=[training_public(r, alive) for r in records
                                             if state is None or r["state"] == state][:limit])


@router.get("/{training_id}", response_model=TrainingJobPublic, responses=_ERRORS)
def get_training_job(training_id: str, request: Request, tq: TrainingQueueDep,
                     models: ModelsDep) -> TrainingJobPublic:
    """A training job's state, stage, epoch, progress, latest metrics, error, and the model it registered."""
    return training_public(_owned(tq, models, request, training_id), tq.alive_trainers())


@router.post("/{training_id}/cancel", response_model=TrainingJobPublic, responses=_ERRORS)
def cancel_training_job(training_id: str, request: Request, tq: TrainingQueueDep,
                        models: ModelsDep) -> TrainingJobPublic:
    """Cancel a queued or running training job: its trainer stops the recipe, no model is registered."""
    _owned(tq, models, request, training_id)
    return training_public(tq.cancel(training_id))


@router.delete("/{training_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_training_job(training_id: str, request: Request, tq: TrainingQueueDep, models: ModelsDep,
                        settings: SettingsDep) -> Response:
    """Delete an ended training job: its record and its folder (the run, checkpoints, logs). A model it
    registered stays (models are shared; remove it from the models directory if it should go)."""
    _owned(tq, models, request, training_id)
    tq.delete(training_id)
    remove_training_files(settings.training_dir, training_id)
    return Response(status_code=204)


async def _events(tq: TrainingQueue, models: ModelRegistry, request: Request, training_id: str,
                  poll_s: float) -> AsyncIterator[str]:
    """Server-sent events: one `progress` event per change, then `end` once the job has ended."""
    last = ""
    while True:
        try:
            record = await run_in_threadpool(_owned, tq, models, request, training_id)
        except TrainingJobNotFound:  # deleted while followed
            yield f"event: end\ndata: {json.dumps({'state': 'deleted', 'model': None})}\n\n"
            return
        alive = await run_in_threadpool(tq.alive_trainers)
        payload = training_public(record, alive).model_dump_json()
        if payload != last:
            last = payload
            yield f"event: progress\ndata: {payload}\n\n"
        if record["state"] in constants.TERMINAL_STATES:
            yield f"event: end\ndata: {json.dumps({'state': record['state'], 'model': record.get('model') or None})}\n\n"
            return
        await asyncio.sleep(poll_s)


@router.get("/{training_id}/events", response_class=StreamingResponse, responses={**_ERRORS, **file_response(
    "server-sent events: `progress` (the job, as GET returns it) per change, then `end`", "text/event-stream")})
def training_events(training_id: str, request: Request, tq: TrainingQueueDep, models: ModelsDep) -> StreamingResponse:
    """Progress as server-sent events (text/event-stream) until the training job ends."""
    _owned(tq, models, request, training_id)  # 404 before the stream starts
    return StreamingResponse(_events(tq, models, request, training_id, constants.EVENTS_POLL_S),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
