"""The queue worker: runs the analysis core's pieces (plan, chunk, finalize) for messages from the Redis stream.

One worker process holds one long-lived predictor per model and its open slides. Before every inference batch it
looks at the job's state, so a cancel stops compute within one batch. While a message is being worked on a
heartbeat thread keeps it claimed; a worker that dies stops the heartbeat and its message is redone elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis

from model.runtime import DensePrediction, InvalidModelError, Prediction, Predictor
from service import constants
from service.analysis.chunks import save_chunk
from service.analysis.finalize import finalize_job
from service.analysis.inference import plan_reader, run_chunk
from service.analysis.plan import AnalysisOptions, InvalidOptionsError, JobPlan, prepare_job
from service.errors import PermanentJobError, ServiceError
from service.jobs.queue import JobQueue, Message, connect
from service.jobs.storage import ModelRegistry, job_dir
from service.lru import LRUCache
from service.settings import Settings, get_settings
from service.slide.errors import SlideError
from service.slide.tile_reader import TileReader
from service.slide.wsi import Slide, open_slide

logger = logging.getLogger(__name__)

__all__ = ["JobCancelled", "Worker", "job_options", "main"]

_MAX_OPEN_SLIDES = 4
# readers with worker processes hold N processes (and their tile caches) each while open: keep fewer of them
_MAX_OPEN_PROCESS_READERS = 2
# errors that retrying cannot fix (an unreadable slide, a refused model): the job fails at once with the reason
_PERMANENT_ERRORS: tuple[type[Exception], ...] = (SlideError, InvalidModelError, InvalidOptionsError, ServiceError,
                                                  PermanentJobError)


class JobCancelled(Exception):
    """The job was cancelled (or superseded) while this worker was on it."""


class _TimedPredictor:
    """Wraps a predictor to publish each batch's latency and fill for /metrics, and to stop a cancelled job."""

    def __init__(self, predictor: Predictor, queue: JobQueue, batch_size: int, check: Callable[[], None]) -> None:
        self._predictor = predictor
        self._queue = queue
        self._batch_size = batch_size
        self._check = check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict(self, tiles: np.ndarray) -> Prediction:
        """Predict one batch (B, S, S, 3) uint8, after checking that the job still wants it."""
        self._check()
        t0 = time.perf_counter()
        out = self._predictor.predict(tiles)
        self._queue.record_batch(int(tiles.shape[0]), self._batch_size, time.perf_counter() - t0)
        return out

    def predict_dense(self, regions: np.ndarray) -> DensePrediction:
        """Predict one batch of regions (B, H, W, 3) uint8, after checking that the job still wants it; the
        batch's fill is counted in model windows (tiles' worth of pixels)."""
        self._check()
        t0 = time.perf_counter()
        out = self._predictor.predict_dense(regions)
        windows = regions.shape[0] * regions.shape[1] * regions.shape[2] / self._predictor.input_size ** 2
        self._queue.record_batch(int(round(windows)), self._batch_size, time.perf_counter() - t0)
        return out


class Worker:
    """Consumes work messages until stopped (or, in burst mode, until the stream is empty)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, name: str | None = None) -> None:
        self.settings = settings
        timeout_s = settings.redis_timeout_s + settings.block_ms / 1000  # a blocking read is not a hang
        self.queue = JobQueue(client or connect(settings.redis_url, socket_timeout_s=timeout_s), settings)
        self.queue.ensure_group()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.models = ModelRegistry(settings.models_dir, settings.default_model)
        self.stop_event = threading.Event()
        self._predictors: dict[str, Predictor] = {}
        self._plans: LRUCache[tuple[str, str], JobPlan] = LRUCache(max_items=_MAX_OPEN_SLIDES)
        # (slide, tile reader) per job run, closed when they fall out
        self._readers: LRUCache[tuple[str, str], tuple[Slide, TileReader]] = LRUCache(
            max_items=_MAX_OPEN_SLIDES, on_evict=_close_reader)
        self.processed = 0

    # --- loop -------------------------------------------------------------------------------------------------
    def run(self, burst: bool = False) -> int:
        """Work until `stop_event` is set (burst: until no message is waiting); returns messages handled."""
        logger.info("worker %s started (storage %s, prefix %s)", self.name, self.settings.storage_dir,
                    self.settings.redis_prefix)
        try:
            while not self.stop_event.is_set():
                try:
                    msg = self.queue.read(self.name, self.settings.block_ms)
                    if msg is None:
                        self.queue.redis.zadd(self.settings.key(constants.WORKERS_KEY), {self.name: time.time()})
                        if burst:
                            break
                        continue
                    self.handle(msg)
                    self.processed += 1
                except (redis.ConnectionError, redis.TimeoutError) as err:
                    # a message being handled stays pending and is reclaimed once Redis is back
                    logger.warning("worker %s: redis unreachable (%s); retrying", self.name, err)
                    self.stop_event.wait(1.0)
                except redis.ResponseError as err:
                    if "NOGROUP" not in str(err):
                        raise
                    # Redis came back empty (restarted without persistence): the jobs it held are lost and
                    # their clients see 410/404; serve the jobs submitted from now on
                    logger.error("worker %s: the queue is gone from Redis (restarted without persistence?); "
                                 "jobs in flight are lost, recreating the consumer group", self.name)
                    self.queue.ensure_group()
        finally:
            self.close()
        return self.processed

    @property
    def open_readers(self) -> int:
        """How many job runs' (slide, tile reader) pairs this worker holds open."""
        return len(self._readers)

    def close(self) -> None:
        """Close tile readers and their slides (predictors go with the process)."""
        self._readers.clear()

    def handle(self, msg: Message) -> None:
        """Run one message with a heartbeat; permanent errors fail the job, others leave it for a retry."""
        try:
            job = self.queue.get(msg.job_id)
        except ServiceError:
            self.queue.ack(msg)
            return
        if job.get("generation") != msg.generation or job["state"] in constants.TERMINAL_STATES:
            self.queue.ack(msg)  # an earlier run of the job, or nothing left to do
            return
        if msg.deliveries > self.settings.max_attempts:
            self._fail(msg, f"{msg.kind} message was abandoned {msg.deliveries - 1} times by workers that died "
                            "(killed, out of memory?); check the worker logs, then resubmit the job")
            return
        with self._heartbeat(msg):
            try:
                self._dispatch(msg, job)
            except JobCancelled:
                logger.info("job %s: %s %s stopped: cancelled", msg.job_id, msg.kind, msg.chunk_id)
                self.queue.ack(msg)
                self._release(msg)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except redis.ResponseError as err:
                if "NOGROUP" in str(err):
                    raise
                self._retry_later(msg, err)
            except Exception as err:
                if isinstance(err, _PERMANENT_ERRORS):
                    self._fail(msg, f"{type(err).__name__}: {err}")
                else:  # anything else may be transient (a storage hiccup): bounded retries
                    self._retry_later(msg, err)

    def _dispatch(self, msg: Message, job: dict[str, str]) -> None:
        if msg.kind == constants.MSG_PLAN:
            self._plan(msg, job)
        elif msg.kind == constants.MSG_CHUNK:
            self._chunk(msg, job)
        elif msg.kind == constants.MSG_FINALIZE:
            self._finalize(msg, job)
        else:
            logger.warning("unknown message kind %r dropped", msg.kind)
            self.queue.ack(msg)

    def _fail(self, msg: Message, reason: str) -> None:
        self.queue.fail(msg.job_id, msg.generation, self._public(reason))
        self.queue.ack(msg)

    def _public(self, reason: str) -> str:
        """A job's error as its users read it: the server's storage paths replaced by what they are."""
        for folder, name in ((self.settings.jobs_dir, "<job storage>"), (self.settings.slides_dir, "<slide storage>"),
                             (self.settings.storage_dir, "<storage>")):
            reason = reason.replace(str(folder.resolve()), name).replace(str(folder), name)
        return reason

    def _retry_later(self, msg: Message, err: Exception) -> None:
        attempts = self.queue.record_failure(msg.job_id, msg.generation, msg.chunk_id)
        what = f"chunk {msg.chunk_id}" if msg.kind == constants.MSG_CHUNK else msg.kind
        logger.exception("job %s: %s failed (attempt %d of %d)", msg.job_id, what, attempts,
                         self.settings.max_attempts)
        if attempts >= self.settings.max_attempts:
            hint = ""
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                hint = "; the shared storage is full: free space there, then resubmit the job"
            elif isinstance(err, OSError):
                hint = "; the shared storage could not be written or read: check that it is mounted and writable, " \
                       "then resubmit the job"
            self._fail(msg, f"{what} failed {attempts} times; last error: {type(err).__name__}: {err}{hint}")
        # else: left unacknowledged; any worker reclaims it after claim_idle_s (a natural backoff)

    @contextmanager
    def _heartbeat(self, msg: Message) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.heartbeat_s):
                try:
                    self.queue.touch(self.name, msg)
                except redis.RedisError as err:
                    logger.warning("heartbeat of %s failed: %s", msg.msg_id, err)

        thread = threading.Thread(target=beat, name=f"heartbeat-{msg.msg_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # --- resources ------------------------------------------------------------------------------------------------
    def _job_dir(self, job_id: str) -> Path:
        return job_dir(self.settings.jobs_dir, job_id)

    def _model_path(self, job: dict[str, str]) -> Path:
        entry = self.models.get(job["model"])
        if entry.sha256 != job["model_sha256"]:
            raise PermanentJobError(
                f"model {job['model']!r} changed since the job was submitted (sha256 {entry.sha256[:12]} != "
                f"{job['model_sha256'][:12]}); resubmit the job to use the current file"
            )
        return entry.path

    def predictor(self, job: dict[str, str]) -> Predictor:
        """The long-lived predictor of the job's model (loaded once per process)."""
        sha = job["model_sha256"]
        if sha not in self._predictors:
            path = self._model_path(job)
            t0 = time.perf_counter()
            predictor = Predictor(path, threads=self.settings.threads or None)
            if predictor.sha256 != sha:  # the file was replaced between the check and the load
                raise PermanentJobError(
                    f"model {job['model']!r} was replaced while the job ran (sha256 {predictor.sha256[:12]} != "
                    f"{sha[:12]}); its results would mix two models, so it stops here; resubmit the job"
                )
            self._predictors[sha] = predictor
            logger.info("worker %s loaded model %s in %.2f s", self.name, path.name, time.perf_counter() - t0)
        return self._predictors[sha]

    def _open_slide(self, job: dict[str, str]) -> Slide:
        mpp = float(job["mpp"]) if job.get("mpp") else None
        return open_slide(self._slide_path(job), mpp_override=mpp)

    def _slide_path(self, job: dict[str, str]) -> Path:
        return (self.settings.storage_dir / job["slide_file"]).resolve()

    def plan_of(self, job_id: str, generation: str, job: dict[str, str]) -> JobPlan:
        key = (job_id, generation)
        plan = self._plans.get(key)
        if plan is None:
            loaded = JobPlan.load(self._job_dir(job_id))
            # batches sized for this worker's device and the slide where this machine mounts the storage,
            # whoever made the plan
            options = dataclasses.replace(loaded.options, batch_size=self.settings.batch_size,
                                          reader_processes=self.settings.reader_processes)
            plan = dataclasses.replace(loaded, options=options, slide_path=str(self._slide_path(job)))
            self._plans.put(key, plan)
        return plan

    def reader_for(self, msg: Message, job: dict[str, str], plan: JobPlan) -> tuple[Slide, TileReader]:
        """(slide, tile reader) kept per job run: the reader's threads and cache serve every chunk of it here."""
        key = (msg.job_id, msg.generation)
        entry = self._readers.get(key)
        if entry is None:
            slide = self._open_slide(job)
            entry = (slide, plan_reader(slide, plan))
            limit = _MAX_OPEN_PROCESS_READERS if plan.options.reader_processes else _MAX_OPEN_SLIDES
            self._readers.put(key, entry, max_items=limit)
        return entry

    def _check_live(self, msg: Message) -> None:
        state, generation = self.queue.redis.hmget(self.queue.job_key(msg.job_id), ["state", "generation"])
        if generation != msg.generation or state in (constants.STATE_CANCELLED, constants.STATE_FAILED):
            raise JobCancelled(msg.job_id)

    # --- the three steps --------------------------------------------------------------------------------------
    def _plan(self, msg: Message, job: dict[str, str]) -> None:
        self.queue.transition(msg.job_id, msg.generation, constants.STATE_QUEUED, constants.STATE_RUNNING,
                              started_at=f"{time.time():.3f}")
        if msg.generation != "1" and job.get("chunks_total", "-1") == "-1":
            # a new run of a failed, cancelled or lost job: start from an empty folder, not its leftovers
            shutil.rmtree(self._job_dir(msg.job_id), ignore_errors=True)
        predictor = self.predictor(job)
        t0 = time.perf_counter()
        plan = prepare_job(self._slide_path(job), predictor.metadata,
                           job_options(job, self.settings), self._job_dir(msg.job_id),
                           max_tiles=self.settings.max_tiles_per_job or None)
        ranges = plan.chunks(self.settings.chunk_size)
        self._check_live(msg)
        self.queue.enqueue_chunks(msg.job_id, msg.generation, ranges)
        self.queue.set_fields(msg.job_id, msg.generation, plan_s=f"{time.perf_counter() - t0:.3f}")
        logger.info("job %s slide %s: planned %d tiles in %d chunks (%.2f s)", msg.job_id, job["slide_id"],
                    sum(len(r) for r in ranges), len(ranges), time.perf_counter() - t0)
        if not ranges:
            self.queue.enqueue_finalize_if_complete(msg.job_id, msg.generation)
        self.queue.ack(msg)

    def _chunk(self, msg: Message, job: dict[str, str]) -> None:
        if msg.chunk_id in self.queue.done_chunks(msg.job_id, msg.generation):
            self.queue.ack(msg)  # redelivered after it was saved: nothing to redo
            return
        plan = self.plan_of(msg.job_id, msg.generation, job)
        predictor = _TimedPredictor(self.predictor(job), self.queue, self.settings.batch_size,
                                    lambda: self._check_live(msg))
        t0 = time.perf_counter()
        slide, reader = self.reader_for(msg, job, plan)
        out = run_chunk(slide, plan, range(msg.start, msg.stop), predictor, reader=reader)
        self._check_live(msg)
        save_chunk(self._job_dir(msg.job_id), msg.chunk_id, out)
        _, finalize = self.queue.complete_chunk(msg, msg.stop - msg.start, self.name)
        logger.debug("job %s slide %s: chunk %d (%d tiles) in %.3f s%s", msg.job_id, job["slide_id"],
                     msg.chunk_id, msg.stop - msg.start, time.perf_counter() - t0,
                     "; finalize queued" if finalize else "")

    def _finalize(self, msg: Message, job: dict[str, str]) -> None:
        moved = self.queue.transition(msg.job_id, msg.generation, constants.STATE_RUNNING, constants.STATE_STITCHING)
        if not moved and job["state"] != constants.STATE_STITCHING:
            self.queue.ack(msg)
            return
        t0 = time.perf_counter()
        plan = self.plan_of(msg.job_id, msg.generation, job)
        predictor = self.predictor(job)
        finalize_job(self._job_dir(msg.job_id), plan, predictor.metadata, job["model_sha256"])
        self.queue.transition(msg.job_id, msg.generation, constants.STATE_STITCHING, constants.STATE_DONE,
                              finished_at=f"{time.time():.3f}", stitch_s=f"{time.perf_counter() - t0:.3f}")
        logger.info("job %s slide %s: done (stitched in %.2f s)", msg.job_id, job["slide_id"],
                    time.perf_counter() - t0)
        self.queue.ack(msg)
        self._release(msg)

    def _release(self, msg: Message) -> None:
        """Close this worker's reader and slide of a job run that ended."""
        entry = self._readers.pop((msg.job_id, msg.generation))
        if entry is not None:
            _close_reader((msg.job_id, msg.generation), entry)


def _close_reader(key: tuple[str, str], entry: tuple[Slide, TileReader]) -> None:
    """Close a job run's tile reader (its threads or processes), then its slide."""
    slide, reader = entry
    reader.close()
    slide.close()


def job_options(job: dict[str, str], settings: Settings) -> AnalysisOptions:
    """The job's AnalysisOptions, with this worker's speed settings."""
    values = json.loads(job.get("options") or "{}")
    values.update(batch_size=settings.batch_size, chunk_size=settings.chunk_size, geojson_gzip=False,
                  reader_processes=settings.reader_processes)
    return AnalysisOptions.from_dict(values)


def main() -> int:
    """Entry point of `python -m service.jobs.worker` (and `pixelcam worker`): work until SIGTERM or SIGINT."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(settings)

    def stop(signum: int, frame: object) -> None:
        logger.info("worker %s: signal %d, stopping after the current message", worker.name, signum)
        worker.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
