"""`/v1/jobs`: idempotent submission, state and progress, server-sent events, cancel; `/v1/analyze` does both."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service import constants
from service.analysis.plan import WORKER_OPTION_KEYS, AnalysisOptions
from service.api.deps import ModelsDep, QueueDep, SettingsDep, SlideStoreDep
from service.api.routes.dicom import resolve_slide_reference
from service.api.routes.slides import receive_slide
from service.api.routes.tiles import TileState, TileStateDep, forget_cached
from service.api.schemas import (
    AnalysisOptionsIn,
    ErrorPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    file_response,
)
from service.api.security import (
    ANONYMOUS,
    Principal,
    active_jobs,
    grant_slide,
    owned_job_ids,
    owns_slide,
    principal_of,
    record_job,
)
from service.errors import (
    InvalidRequest,
    JobConflict,
    JobLost,
    JobNotFound,
    RateLimited,
    ServiceError,
    SlideNotFound,
)
from service.jobs.queue import JobQueue, dumps_options
from service.jobs.storage import ModelRegistry, SlideRecord, SlideStore, job_dir, remove_job_files
from service.jobs.training_queue import TrainingJobNotFound, TrainingQueue
from service.jobs.training_request import remove_training_files
from service.settings import Settings
from service.slide.metadata import MPP_RANGE

logger = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}, 422: {"model": ErrorPublic},
    429: {"model": ErrorPublic},
}
# asking again for a job that exists (same slide, model and parameters) answers it with 200 instead of 202
_SAME_JOB: dict[int | str, dict[str, Any]] = {
    200: {"model": JobPublic, "description": "the same job already exists (same slide, model and parameters): "
                                             "its current state; nothing is queued again"},
}
_SUBMIT_LOCK = threading.Lock()  # the per-key job limit is checked and the job created as one step
_LIMIT_RETRY_S = 10.0


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "", "-1") else None


def job_public(record: dict[str, str], workers: dict[str, int] | None = None) -> JobPublic:
    """The API view of a job hash, with throughput and ETA computed now."""
    job_id = record["job_id"]
    total = int(record.get("tiles_total", "-1"))
    done = int(record.get("tiles_done", "0"))
    started = _float(record.get("started_at"))
    finished = _float(record.get("finished_at"))
    elapsed = ((finished or time.time()) - started) if started else 0.0
    throughput = done / elapsed if elapsed > 0 and done > 0 else None
    state = record["state"]
    eta = None
    if throughput and total >= 0 and state == constants.STATE_RUNNING:
        eta = max(total - done, 0) / throughput
    elif state == constants.STATE_DONE:
        eta = 0.0
    links = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events",
             "cancel": f"/v1/jobs/{job_id}/cancel", "slide": f"/v1/slides/{record['slide_id']}"}
    if state == constants.STATE_DONE:
        links.update(result=f"/v1/jobs/{job_id}/result", geojson=f"/v1/jobs/{job_id}/geojson",
                     heatmap_png=f"/v1/jobs/{job_id}/heatmap.png", heatmap_tif=f"/v1/jobs/{job_id}/heatmap.tif",
                     dicom=f"/v1/jobs/{job_id}/dicom")
    return JobPublic(
        job_id=job_id, slide_id=record["slide_id"], model=record.get("model", ""),
        model_sha256=record.get("model_sha256", ""), state=state, tiles_done=done,
        tiles_total=total if total >= 0 else None, chunks_done=int(record.get("chunks_done", "0")),
        chunks_total=(int(record["chunks_total"]) if int(record.get("chunks_total", "-1")) >= 0 else None),
        progress=(done / total if total > 0 else (1.0 if state == constants.STATE_DONE else 0.0)),
        throughput_tiles_per_s=throughput, eta_s=eta, created_at=float(record.get("created_at", "0")),
        started_at=started, finished_at=finished, error=record.get("error") or None,
        mpp=_float(record.get("mpp")), options=json.loads(record.get("options") or "{}"), links=links,
        workers=workers or {},
        timings_s={stage: float(record[f"{stage}_s"]) for stage in ("plan", "stitch") if record.get(f"{stage}_s")},
    )


def canonical_options(body: JobCreate) -> dict[str, Any]:
    """The job's analysis options with every default filled in (so equal requests hash equal), minus speed knobs."""
    given = body.options.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
    raw = {k: v for k, v in given.items() if k not in WORKER_OPTION_KEYS}
    if body.mpp is not None:
        raw["mpp_override"] = body.mpp
    try:
        options = AnalysisOptions.from_dict(raw).to_dict()
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"invalid analysis options {given!r}: {err}") from err
    return {k: v for k, v in options.items() if k not in WORKER_OPTION_KEYS}


def submit_job(queue: JobQueue, slides: SlideStore, models: ModelRegistry, body: JobCreate, jobs_root: Path,
               slide: SlideRecord | None = None, who: Principal = ANONYMOUS,
               max_active: int = 0) -> tuple[dict[str, str], bool]:
    """Create the job (or find the identical one): its id hashes the slide, the model's checksum and parameters.

    With API keys the key's id is hashed in too: each key has its own jobs, even on the same slide.
    """
    if body.slide_id is None:
        raise InvalidRequest("the job names no stored slide; resolve its dicomweb reference first")
    if not owns_slide(queue, who, body.slide_id):
        raise SlideNotFound(f"no slide {body.slide_id}; upload it with POST /v1/slides")
    slide = slide or slides.get(body.slide_id)
    model = models.get(body.model)
    options = canonical_options(body)
    mpp = options.get("mpp_override")
    if mpp is None and slide.info.get("mpp_x") is None:
        raise InvalidRequest(
            f"slide {slide.slide_id} has no microns-per-pixel in its metadata; give it explicitly with \"mpp\""
        )
    params = dumps_options(options)
    identity = f"{slide.slide_id}:{model.sha256}:{params}"
    if who.authenticated:
        identity = f"{who.key_id}:{identity}"
    job_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
    fields = {"slide_id": slide.slide_id, "slide_file": str(slide.path.relative_to(slides.root.parent)),
              "model": model.name, "model_sha256": model.sha256, "options": params,
              "mpp": "" if mpp is None else repr(float(mpp)), "owner": who.key_id}
    # a done job whose files are gone from the shared storage is run again instead of pointing at nothing
    missing = not (job_dir(jobs_root, job_id) / "result.json").is_file()
    # the lock only serves the per-key limit: `queue.submit` is atomic on its own (WATCH/MULTI)
    with _SUBMIT_LOCK if max_active else contextlib.nullcontext():
        if max_active and active_jobs(queue, who) >= max_active:
            existing = queue.redis.hget(queue.job_key(job_id), "state")
            if existing is None or existing in constants.TERMINAL_STATES:  # asking for a job it has is always fine
                raise RateLimited(
                    f"this key has {max_active} unfinished jobs, the most it may have at once "
                    "(PIXELCAM_MAX_ACTIVE_JOBS_PER_KEY); wait for one to finish or cancel one", _LIMIT_RETRY_S)
        record, created = queue.submit(job_id, fields, rerun_done=missing)
        if created:
            record_job(queue, who, job_id, float(record["created_at"]))
    return record, created


def _respond(response: Response, record: dict[str, str], created: bool) -> JobPublic:
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{record['job_id']}"
    return job_public(record)


@router.post("/v1/jobs", response_model=JobPublic, status_code=202, responses={
    **_ERRORS, **_SAME_JOB, 403: {"model": ErrorPublic}, 502: {"model": ErrorPublic}})
def create_job(body: JobCreate, request: Request, response: Response, queue: QueueDep, slides: SlideStoreDep,
               models: ModelsDep, settings: SettingsDep) -> JobPublic:
    """Analyse an uploaded slide, or a DICOMweb series (imported once over WADO-RS from an allowed archive); the
    same slide, model and parameters return the existing job."""
    body = resolve_slide_reference(body, request, queue, slides, settings)
    record, created = submit_job(queue, slides, models, body, settings.jobs_dir, who=principal_of(request),
                                 max_active=settings.max_active_jobs_per_key)
    return _respond(response, record, created)


@router.post("/v1/analyze", response_model=JobPublic, status_code=202, responses={**_ERRORS, **_SAME_JOB})
async def upload_and_analyze(
    request: Request,
    response: Response,
    queue: QueueDep,
    slides: SlideStoreDep,
    models: ModelsDep,
    settings: SettingsDep,
    filename: str | None = Query(None, description="original file name; only its extension is kept"),
    model: str | None = Query(None, description="model name; the default model when absent"),
    mpp: float | None = Query(None, ge=MPP_RANGE[0], le=MPP_RANGE[1],
                              description="override the slide's microns per level-0 pixel"),
    options: str = Query("{}", description="analysis options as a JSON object"),
) -> JobPublic:
    """Upload a slide (raw body) and start its analysis in one request."""
    try:
        parsed = json.loads(options)
    except ValueError as err:
        raise InvalidRequest(f"options must be a JSON object, got {options!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"options must be a JSON object, got {options!r}")
    try:  # checked before the upload is read: a bad option costs the client no transfer
        checked = AnalysisOptionsIn.model_validate(parsed)
    except ValidationError as err:
        parts = [f"options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise InvalidRequest("; ".join(parts)) from err
    slide = await receive_slide(request, slides, settings, filename)
    who = principal_of(request)
    await run_in_threadpool(grant_slide, queue, who, slide.slide_id)
    body = JobCreate(slide_id=slide.slide_id, model=model, mpp=mpp, options=checked)
    record, created = await run_in_threadpool(submit_job, queue, slides, models, body, settings.jobs_dir, slide,
                                              who, settings.max_active_jobs_per_key)
    return _respond(response, record, created)


@router.get("/v1/jobs", response_model=JobsPublic, responses=_ERRORS)
def list_jobs(request: Request, queue: QueueDep, limit: int = Query(50, ge=1, le=1000),
              state: str | None = Query(None, description="only jobs in this state")) -> JobsPublic:
    """Recent jobs (of the caller's key when keys are configured), newest first."""
    if state is not None and state not in constants.JOB_STATES:
        raise InvalidRequest(f"unknown state {state!r}; use one of {', '.join(constants.JOB_STATES)}")
    job_ids = owned_job_ids(queue, principal_of(request), limit if state is None else 10 * limit)
    with queue.redis.pipeline(transaction=False) as pipe:  # one round trip, not one per job
        for job_id in job_ids:
            pipe.hgetall(queue.job_key(job_id))
        rows: list[dict[str, str]] = pipe.execute()
    records = [r for r in rows if r and (state is None or r["state"] == state)][:limit]
    return JobsPublic(jobs=[job_public(r) for r in records])


@router.get("/v1/jobs/{job_id}", response_model=JobPublic, responses={**_ERRORS, 410: {"model": ErrorPublic}})
def get_job(job_id: str, queue: QueueDep, settings: SettingsDep) -> JobPublic:
    """A job's state, progress, throughput and ETA."""
    try:
        record = queue.get(job_id)
    except JobNotFound as err:
        try:
            known = job_dir(settings.jobs_dir, job_id).is_dir()
        except ServiceError:
            known = False
        if known:
            raise JobLost(
                f"job {job_id} has files on the storage but the queue has no record of it (Redis restarted "
                "without persistence?); submit it again: the same request gives the same job id"
            ) from err
        raise
    return job_public(record, queue.workers_of(job_id, record["generation"]))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic, responses=_ERRORS)
def cancel_job(job_id: str, queue: QueueDep) -> JobPublic:
    """Cancel a queued or running job; workers stop before their next batch."""
    return job_public(queue.cancel(job_id))


@router.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response, responses=_ERRORS)
def delete_job(job_id: str, queue: QueueDep, settings: SettingsDep, state: TileStateDep) -> Response:
    """Delete an ended job for good: its results, chunk files and Redis keys (409 while it runs: cancel first)."""
    erase_job(queue, settings, state, job_id)
    return Response(status_code=204)


@router.delete("/v1/slides/{slide_id}", status_code=204, response_class=Response, tags=["slides"],
               responses=_ERRORS)
def delete_slide(slide_id: str, request: Request, queue: QueueDep, slides: SlideStoreDep, settings: SettingsDep,
                 state: TileStateDep) -> Response:
    """Delete a slide and everything made from it: its jobs' results and keys, its file, cached tiles (409 while
    one of its jobs is queued or running: cancel those first). With API keys, a slide that another key uploaded
    too stays stored for that key: only the caller's jobs and ownership go."""
    slides.get(slide_id)  # 404 for an unknown slide
    who = principal_of(request)
    jobs = {j: st for j, (st, owner) in queue.jobs_of_slide(slide_id).items()
            if not who.authenticated or owner == who.key_id}
    active = sorted(j for j, st in jobs.items() if st not in constants.TERMINAL_STATES)
    if active:
        raise JobConflict(f"slide {slide_id} has {len(active)} unfinished job(s) ({', '.join(active[:5])}); cancel "
                          "them (POST /v1/jobs/{job_id}/cancel), then delete the slide")
    training: TrainingQueue = request.app.state.training
    trainings = sorted(t for t, (owner, _) in training.slide_users(slide_id).items()
                       if not who.authenticated or owner == who.key_id)
    if trainings:
        raise JobConflict(f"slide {slide_id} is used by {len(trainings)} unfinished training job(s) "
                          f"({', '.join(trainings[:5])}); cancel them (POST /v1/training-jobs/{{id}}/cancel) or let "
                          "them finish, then delete the slide")
    for job_id in jobs:
        erase_job(queue, settings, state, job_id)
    others = queue.slide_owners(slide_id) - {who.key_id} if who.authenticated else set()
    queue.forget_slide(slide_id, {who.key_id} if who.authenticated else None)
    if not others:
        slides.delete(slide_id)
        forget_cached(state, slide_id)
    logger.info("slide %s deleted with %d job(s)%s", slide_id, len(jobs),
                f"; kept for {len(others)} other key(s)" if others else "")
    return Response(status_code=204)


def erase_job(queue: JobQueue, settings: Settings, state: TileState | None, job_id: str) -> None:
    """Everything of one ended job: Redis keys first (so no one finds it), then its folder and cached tiles."""
    queue.delete(job_id)
    remove_job_files(settings.jobs_dir, job_id)
    if state is not None:
        forget_cached(state, job_id)


def sweep_expired(queue: JobQueue, settings: Settings, slides: SlideStore, state: TileState | None,
                  now: float | None = None, training: TrainingQueue | None = None) -> tuple[int, int]:
    """Retention: delete ended jobs (and ended training jobs: their record and folder, not their model) older than
    `retention_days`, then slides not uploaded within it that no job uses any more. Returns (jobs, slides)
    deleted, training jobs counted with the jobs."""
    cutoff = (time.time() if now is None else now) - settings.retention_days * 86400.0
    job_ids = queue.list_ids(10_000_000)
    with queue.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(queue.job_key(job_id), ["state", "finished_at", "slide_id"])
        rows = pipe.execute()
    jobs = slides_deleted = 0
    in_use: set[str] = set()
    for job_id, (st, finished, slide_id) in zip(job_ids, rows, strict=True):
        if st in constants.TERMINAL_STATES and finished and float(finished) < cutoff:
            with contextlib.suppress(JobNotFound, JobConflict):  # deleted or resubmitted meanwhile
                erase_job(queue, settings, state, job_id)
                jobs += 1
        elif slide_id:
            in_use.add(str(slide_id))
    if training is not None:
        for training_id in training.ended_before(cutoff):
            with contextlib.suppress(TrainingJobNotFound, JobConflict):
                training.delete(training_id)
                remove_training_files(settings.training_dir, training_id)
                jobs += 1
        # slides an unfinished training job trains on stay until it ends
        in_use.update(s for _, used in training.slide_users().values() for s in used)
    for slide_id in slides.ids_older_than(cutoff):
        if slide_id in in_use:
            continue
        with contextlib.suppress(SlideNotFound):
            slides.delete(slide_id)
            queue.forget_slide(slide_id)
            if state is not None:
                forget_cached(state, slide_id)
            slides_deleted += 1
    if jobs or slides_deleted:
        logger.info("retention (%g days): deleted %d job(s) and %d slide(s)", settings.retention_days, jobs,
                    slides_deleted)
    return jobs, slides_deleted


async def _events(queue: JobQueue, job_id: str, poll_s: float) -> AsyncIterator[str]:
    """Server-sent events: one `progress` event per change, then `end` once the job has finished."""
    last = ""
    while True:
        record = await run_in_threadpool(queue.get, job_id)
        payload = job_public(record).model_dump_json()
        if payload != last:
            last = payload
            yield f"event: progress\ndata: {payload}\n\n"
        if record["state"] in constants.TERMINAL_STATES:
            yield f"event: end\ndata: {json.dumps({'state': record['state']})}\n\n"
            return
        await asyncio.sleep(poll_s)


@router.get("/v1/jobs/{job_id}/events", responses={**_ERRORS, **file_response(
    "server-sent events: `progress` per change, then `end`", "text/event-stream")},
            response_class=StreamingResponse)
def job_events(job_id: str, queue: QueueDep) -> StreamingResponse:
    """Progress as server-sent events (text/event-stream) until the job ends."""
    queue.get(job_id)  # 404 before the stream starts
    return StreamingResponse(_events(queue, job_id, constants.EVENTS_POLL_S), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
