"""The job queue on Redis: a job hash per job, one Redis Stream of work messages, one consumer group of workers.

A message carries ids and a tile-index range, never pixels. Delivery is at least once: a message whose worker died
is reclaimed (XAUTOCLAIM) after `claim_idle_s`; chunk results are idempotent files, so a redone chunk is harmless.
The worker whose chunk completes the set enqueues the single finalize message (an atomic script with a SET NX flag).
Every run of a job has a generation number; messages of an earlier run are acknowledged and skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from service import constants
from service.errors import JobConflict, JobNotFound, QueueUnavailable
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["JobQueue", "Message", "connect"]

# KEYS: job, done set, finalize flag, stream, workers hash, pending chunks list.
# ARGV: generation, chunk id, n tiles, message id, group, job id, worker name.
# Returns [newly_done (0/1), finalize_enqueued (0/1)].
# A newly done chunk of a running job puts the job's next pending chunk on the stream (at its end), so every job
# keeps at most `chunks_in_flight` messages queued and jobs take turns, chunk by chunk.
_COMPLETE_CHUNK = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then
  redis.call('XACK', KEYS[4], ARGV[5], ARGV[4]); redis.call('XDEL', KEYS[4], ARGV[4])
  return {0, 0}
end
local added = redis.call('SADD', KEYS[2], ARGV[2])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'tiles_done', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
  redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
end
redis.call('XACK', KEYS[4], ARGV[5], ARGV[4]); redis.call('XDEL', KEYS[4], ARGV[4])
local total = tonumber(redis.call('HGET', KEYS[1], 'chunks_total') or '-1')
local state = redis.call('HGET', KEYS[1], 'state')
if added == 1 and state == 'running' then
  local nxt = redis.call('LPOP', KEYS[6])
  if nxt then
    local c, a, b = string.match(nxt, '^(%d+):(%d+):(%d+)$')
    redis.call('XADD', KEYS[4], '*', 'kind', 'chunk', 'job_id', ARGV[6], 'generation', ARGV[1],
               'chunk_id', c, 'start', a, 'stop', b)
  end
end
if total >= 0 and redis.call('SCARD', KEYS[2]) >= total and state == 'running' then
  if redis.call('SET', KEYS[3], '1', 'NX') then
    redis.call('XADD', KEYS[4], '*', 'kind', 'finalize', 'job_id', ARGV[6], 'generation', ARGV[1])
    return {added, 1}
  end
end
return {added, 0}
"""

# KEYS: job. ARGV: generation, allowed states (comma list), new state, then field/value pairs.
# Returns 1 when the transition happened.
_TRANSITION = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == state then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True)
class Message:
    """One work message as a worker receives it."""

    msg_id: str
    kind: str
    job_id: str
    generation: str
    chunk_id: int = -1
    start: int = 0
    stop: int = 0
    deliveries: int = 1


def connect(url: str, socket_timeout_s: float = 30.0) -> redis.Redis:
    """A Redis client for `url` that answers strings; fails fast with a fix when the server is unreachable.

    Every call is bounded: connecting by 5 s, any reply by `socket_timeout_s` (longer than a worker's blocking
    read), so a Redis that hangs fails requests with a timeout instead of hanging them.
    """
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                  socket_timeout=socket_timeout_s, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as err:
        raise QueueUnavailable(
            f"cannot reach Redis at {url}: {err}; start it, fix PIXELCAM_REDIS_URL, or leave PIXELCAM_REDIS_URL "
            "empty so that `pixelcam serve` starts a private one"
        ) from err
    return client


class JobQueue:
    """Job records and work messages in Redis, under the settings' key prefix."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.stream = settings.key(constants.STREAM_KEY)
        self._complete = client.register_script(_COMPLETE_CHUNK)
        self._transition = client.register_script(_TRANSITION)
        self._claim_cursor = "0-0"

    # --- keys -------------------------------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        """The hash of one job."""
        return self.settings.key(constants.JOB_KEY, job_id=job_id)

    def _done_key(self, job_id: str, generation: str) -> str:
        return self.settings.key(constants.JOB_DONE_KEY, job_id=job_id, generation=generation)

    def _failures_key(self, job_id: str, generation: str) -> str:
        return self.settings.key(constants.JOB_FAILURES_KEY, job_id=job_id, generation=generation)

    def _flag_key(self, job_id: str, generation: str) -> str:
        return self.settings.key(constants.JOB_FINALIZE_FLAG_KEY, job_id=job_id, generation=generation)

    def _pending_key(self, job_id: str, generation: str) -> str:
        return self.settings.key(constants.JOB_PENDING_KEY, job_id=job_id, generation=generation)

    # --- setup ------------------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist."""
        try:
            self.redis.xgroup_create(self.stream, constants.GROUP_NAME, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    # --- jobs -------------------------------------------------------------------------------------------------
    def submit(self, job_id: str, fields: Mapping[str, str], rerun_done: bool = False) -> tuple[dict[str, str], bool]:
        """Create the job and queue its plan message; an existing live or finished job is returned as it is.

        A failed or cancelled job runs again (a new generation); so does a done one when `rerun_done`.
        """
        rerun = {constants.STATE_FAILED, constants.STATE_CANCELLED} | ({constants.STATE_DONE} if rerun_done else set())
        key = self.job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    current: dict[str, str] = pipe.hgetall(key)  # type: ignore[assignment]
                    if current and current.get("state") not in rerun:
                        pipe.unwatch()
                        return current, False
                    generation = str(int(current.get("generation", "0")) + 1)
                    now = f"{time.time():.3f}"
                    record: dict[Any, Any] = {**fields, "job_id": job_id, "state": constants.STATE_QUEUED, "generation": generation,
                              "created_at": now, "started_at": "", "finished_at": "", "error": "",
                              "tiles_total": "-1", "tiles_done": "0", "chunks_total": "-1", "chunks_done": "0"}
                    pipe.multi()
                    pipe.delete(key)
                    pipe.hset(key, mapping=record)
                    pipe.zadd(self.settings.key(constants.JOBS_INDEX_KEY), {job_id: float(now)})
                    pipe.xadd(self.stream, {"kind": constants.MSG_PLAN, "job_id": job_id, "generation": generation})
                    pipe.execute()
                    logger.info("job %s queued (generation %s, slide %s)", job_id, generation,
                                fields.get("slide_id", ""))
                    return {k: str(v) for k, v in record.items()}, True
                except redis.WatchError:
                    continue

    def get(self, job_id: str) -> dict[str, str]:
        """The job's hash; JobNotFound when there is none."""
        record: dict[str, str] = self.redis.hgetall(self.job_key(job_id))  # type: ignore[assignment]
        if not record:
            raise JobNotFound(f"no job {job_id!r}; list jobs with GET /v1/jobs or submit one with POST /v1/jobs")
        return record

    def list_ids(self, limit: int = 100) -> list[str]:
        """The most recent job ids, newest first."""
        return list(self.redis.zrevrange(self.settings.key(constants.JOBS_INDEX_KEY), 0, limit - 1))  # type: ignore[arg-type]

    def cancel(self, job_id: str) -> dict[str, str]:
        """Mark the job cancelled; workers stop before their next batch. Finished jobs cannot be cancelled."""
        record = self.get(job_id)
        state = record["state"]
        if state == constants.STATE_CANCELLED:
            return record
        if state in (constants.STATE_DONE, constants.STATE_FAILED):
            raise JobConflict(f"job {job_id} is already {state}; only queued or running jobs can be cancelled")
        allowed = ",".join((constants.STATE_QUEUED, constants.STATE_RUNNING, constants.STATE_STITCHING))
        if not self.transition(job_id, record["generation"], allowed, constants.STATE_CANCELLED,
                               finished_at=f"{time.time():.3f}"):
            return self.cancel(job_id)  # the state moved under us: look again
        logger.info("job %s cancelled", job_id)
        return self.get(job_id)

    def delete(self, job_id: str) -> dict[str, str]:
        """Remove an ended job from Redis: its record, every per-run key, and the job and owner indexes.

        Queued, running or stitching jobs are refused (JobConflict): cancel first. A worker still busy with a
        cancelled job's batch checks the job again before it writes, finds it gone and writes nothing.
        """
        record = self.get(job_id)
        if record["state"] not in constants.TERMINAL_STATES:
            raise JobConflict(f"job {job_id} is {record['state']}; cancel it first (POST /v1/jobs/{job_id}/cancel), "
                              "then delete it")
        key = self.job_key(job_id)
        keys = [key, *self.redis.scan_iter(match=f"{key}:*", count=1000)]
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.zrem(self.settings.key(constants.JOBS_INDEX_KEY), job_id)
            owner = record.get("owner")
            if owner:
                pipe.zrem(self.settings.key(constants.OWNER_JOBS_KEY, key_id=owner), job_id)
                pipe.srem(self.settings.key(constants.OWNER_ACTIVE_KEY, key_id=owner), job_id)
            pipe.execute()
        logger.info("job %s deleted (%d keys)", job_id, len(keys))
        return record

    def jobs_of_slide(self, slide_id: str) -> dict[str, tuple[str, str]]:
        """job id -> (state, owner key id) of every job whose slide is `slide_id`."""
        job_ids = [str(j) for j in self.redis.zrange(self.settings.key(constants.JOBS_INDEX_KEY), 0, -1)]  # type: ignore[union-attr]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.job_key(job_id), ["slide_id", "state", "owner"])
            rows = pipe.execute()
        return {j: (str(state), str(owner or "")) for j, (slide, state, owner) in zip(job_ids, rows, strict=True)
                if slide == slide_id}

    def slide_owners(self, slide_id: str) -> set[str]:
        """The key ids whose set of owned slides holds `slide_id`."""
        pattern = self.settings.key(constants.OWNER_SLIDES_KEY, key_id="*")
        prefix, suffix = pattern.split("*")
        return {str(k)[len(prefix):len(str(k)) - len(suffix)] for k in self.redis.scan_iter(match=pattern, count=1000)
                if self.redis.sismember(k, slide_id)}

    def forget_slide(self, slide_id: str, key_ids: set[str] | None = None) -> None:
        """Drop a slide id from these keys' sets of owned slides (default: every key's)."""
        for key_id in self.slide_owners(slide_id) if key_ids is None else key_ids:
            self.redis.srem(self.settings.key(constants.OWNER_SLIDES_KEY, key_id=key_id), slide_id)

    def transition(self, job_id: str, generation: str, allowed: str, state: str, **fields: str) -> bool:
        """Move the job to `state` if it is still this generation and in one of the `allowed` states (a run that
        ends, or starts, is counted for /metrics)."""
        moved = self._move(job_id, generation, allowed, state, **fields)
        if moved and (state in constants.TERMINAL_STATES or "started_at" in fields):
            self._record_timing(job_id, state)
        return moved

    def _move(self, job_id: str, generation: str, allowed: str, state: str, **fields: str) -> bool:
        args: list[str] = [generation, allowed, state]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._transition(keys=[self.job_key(job_id)], args=args))

    def _record_timing(self, job_id: str, state: str) -> None:
        """Count a run's outcome and its time, or its queue wait when it starts, for /metrics."""
        created, started, finished = self.redis.hmget(self.job_key(job_id), ["created_at", "started_at", "finished_at"])
        key = self.settings.key(constants.STATS_KEY)
        with self.redis.pipeline(transaction=False) as pipe:
            if state in constants.TERMINAL_STATES:
                pipe.hincrby(key, f"jobs_outcome:{state}", 1)
                if created and finished:
                    _observe(pipe, key, f"job_seconds:{state}", float(finished) - float(created))
            elif created and started:
                _observe(pipe, key, "queue_wait_seconds", float(started) - float(created))
            pipe.execute()

    def set_fields(self, job_id: str, generation: str, **fields: str) -> None:
        """Update fields of the job if it is still this generation (no state change)."""
        states = ",".join(constants.JOB_STATES)
        record = self.redis.hmget(self.job_key(job_id), ["state", "generation"])
        if record[1] == generation and record[0]:
            self._move(job_id, generation, states, str(record[0]), **fields)  # no state change: nothing to count

    def fail(self, job_id: str, generation: str, reason: str) -> bool:
        """Mark the job failed with a reason, unless it already ended."""
        allowed = ",".join((constants.STATE_QUEUED, constants.STATE_RUNNING, constants.STATE_STITCHING))
        changed = self.transition(job_id, generation, allowed, constants.STATE_FAILED, error=reason,
                                  finished_at=f"{time.time():.3f}")
        if changed:
            logger.error("job %s failed: %s", job_id, reason)
        return changed

    def enqueue_chunks(self, job_id: str, generation: str, ranges: Sequence[range]) -> bool:
        """Record the plan's size and queue one message per chunk, once per generation; False if already done."""
        key = self.job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    gen, chunks_total = pipe.hmget(key, ["generation", "chunks_total"])
                    if gen != generation or (chunks_total not in (None, "-1")):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={"chunks_total": str(len(ranges)),
                                            "tiles_total": str(sum(len(r) for r in ranges))})
                    window = self.settings.chunks_in_flight
                    for chunk_id, rng in enumerate(ranges[:window]):
                        pipe.xadd(self.stream, {"kind": constants.MSG_CHUNK, "job_id": job_id, "generation": generation,
                                                "chunk_id": str(chunk_id), "start": str(rng.start),
                                                "stop": str(rng.stop)})
                    pending = [f"{c}:{r.start}:{r.stop}" for c, r in enumerate(ranges) if c >= window]
                    for at in range(0, len(pending), 10_000):  # the rest wait in the job's list
                        pipe.rpush(self._pending_key(job_id, generation), *pending[at : at + 10_000])
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def enqueue_finalize_if_complete(self, job_id: str, generation: str) -> bool:
        """Queue the finalize message when every chunk is done (used for plans with no chunks)."""
        record = self.redis.hmget(self.job_key(job_id), ["chunks_total", "state", "generation"])
        if record[2] != generation or record[1] != constants.STATE_RUNNING:
            return False
        done = int(self.redis.scard(self._done_key(job_id, generation)))
        if int(record[0] or -1) < 0 or done < int(record[0] or 0):
            return False
        if self.redis.set(self._flag_key(job_id, generation), "1", nx=True):
            self.redis.xadd(self.stream, {"kind": constants.MSG_FINALIZE, "job_id": job_id, "generation": generation})
            return True
        return False

    def complete_chunk(self, msg: Message, n_tiles: int, worker: str = "") -> tuple[bool, bool]:
        """Mark a chunk done and acknowledge it; returns (newly done, this call queued the finalize)."""
        keys = [self.job_key(msg.job_id), self._done_key(msg.job_id, msg.generation),
                self._flag_key(msg.job_id, msg.generation), self.stream,
                self.settings.key(constants.JOB_WORKERS_KEY, job_id=msg.job_id, generation=msg.generation),
                self._pending_key(msg.job_id, msg.generation)]
        args = [msg.generation, str(msg.chunk_id), str(n_tiles), msg.msg_id, constants.GROUP_NAME, msg.job_id,
                worker or "unknown"]
        added, finalize = self._complete(keys=keys, args=args)
        return bool(added), bool(finalize)

    def done_chunks(self, job_id: str, generation: str) -> set[int]:
        """The ids of the chunks finished in this run of the job."""
        return {int(c) for c in self.redis.smembers(self._done_key(job_id, generation))}

    def workers_of(self, job_id: str, generation: str) -> dict[str, int]:
        """How many chunks of this run of the job each worker finished."""
        key = self.settings.key(constants.JOB_WORKERS_KEY, job_id=job_id, generation=generation)
        raw: dict[str, str] = self.redis.hgetall(key)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}

    def record_failure(self, job_id: str, generation: str, chunk_id: int) -> int:
        """Count one failed attempt at a chunk; returns the attempts so far."""
        return int(self.redis.hincrby(self._failures_key(job_id, generation), str(chunk_id), 1))

    # --- messages ---------------------------------------------------------------------------------------------
    def read(self, consumer: str, block_ms: int) -> Message | None:
        """The next message for this consumer: a reclaimed one from a dead worker first, else a new one."""
        # XAUTOCLAIM looks at a bounded stretch of the pending list per call: walk it with a cursor so that a
        # dead worker's message behind many live ones is found too
        claimed: Any = self.redis.xautoclaim(self.stream, constants.GROUP_NAME, consumer, start_id=self._claim_cursor,
                                         min_idle_time=int(self.settings.claim_idle_s * 1000), count=1)
        self._claim_cursor = str(claimed[0]) if claimed and claimed[0] else "0-0"
        entries = claimed[1] if claimed else []
        if entries:
            msg_id, fields = entries[0]
            if fields:
                pending: Any = self.redis.xpending_range(self.stream, constants.GROUP_NAME, min=msg_id, max=msg_id, count=1)
                deliveries = int(pending[0]["times_delivered"]) if pending else 1
                logger.warning("reclaimed message %s (job %s) after %s deliveries", msg_id,
                               fields.get("job_id"), deliveries)
                return _message(msg_id, fields, deliveries)
        reply: Any = self.redis.xreadgroup(constants.GROUP_NAME, consumer, {self.stream: ">"}, count=1, block=block_ms)
        if not reply:
            return None
        _, items = reply[0]
        msg_id, fields = items[0]
        return _message(msg_id, fields, 1)

    def ack(self, msg: Message) -> None:
        """Acknowledge and delete a message (the stream holds only unfinished work)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, constants.GROUP_NAME, msg.msg_id)
            pipe.xdel(self.stream, msg.msg_id)
            pipe.execute()

    def touch(self, consumer: str, msg: Message) -> None:
        """Reset the message's idle time so that no other worker reclaims it while this one is busy."""
        self.redis.xclaim(self.stream, constants.GROUP_NAME, consumer, min_idle_time=0, message_ids=[msg.msg_id], justid=True)
        self.redis.zadd(self.settings.key(constants.WORKERS_KEY), {consumer: time.time()})

    def depth(self) -> tuple[int, int]:
        """(messages waiting for a worker, messages being worked on)."""
        try:
            groups = self.redis.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0, 0
        for group in groups:
            if group["name"] == constants.GROUP_NAME:
                return int(group.get("lag") or 0), int(group.get("pending") or 0)
        return 0, 0

    def alive_workers(self) -> int:
        """Workers seen within `WORKER_ALIVE_TTL_S`."""
        key = self.settings.key(constants.WORKERS_KEY)
        self.redis.zremrangebyscore(key, "-inf", time.time() - 100 * constants.WORKER_ALIVE_TTL_S)
        return int(self.redis.zcount(key, time.time() - constants.WORKER_ALIVE_TTL_S, "+inf"))

    # --- stats for /metrics -----------------------------------------------------------------------------------
    def record_batch(self, n_tiles: int, batch_size: int, latency_s: float) -> None:
        """Publish one inference batch's size and latency (the API aggregates them for /metrics)."""
        key = self.settings.key(constants.STATS_KEY)
        bucket = next((str(b) for b in constants.LATENCY_BUCKETS_S if latency_s <= b), "+Inf")
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "batches", 1)
            pipe.hincrby(key, "tiles", n_tiles)
            pipe.hincrbyfloat(key, "batch_fill_sum", n_tiles / batch_size)
            pipe.hincrbyfloat(key, "latency_sum_s", latency_s)
            pipe.hincrby(key, f"latency_bucket:{bucket}", 1)
            pipe.execute()

    def stats(self) -> dict[str, str]:
        """The counters workers published."""
        return self.redis.hgetall(self.settings.key(constants.STATS_KEY))  # type: ignore[return-value]

    def states(self, job_ids: Sequence[str]) -> list[dict[str, Any]]:
        """State, progress and timing fields of many jobs at once."""
        fields = ["state", "tiles_done", "started_at", "finished_at"]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.job_key(job_id), fields)
            rows = pipe.execute()
        return [dict(zip(fields, row, strict=True)) for row in rows if row[0] is not None]


def _observe(pipe: Any, key: str, name: str, value: float) -> None:
    """One histogram observation as hash counters: `<name>:bucket:<bound>` (not cumulative) and `<name>:sum`."""
    bound = next((str(b) for b in constants.JOB_TIME_BUCKETS_S if value <= b), "+Inf")
    pipe.hincrby(key, f"{name}:bucket:{bound}", 1)
    pipe.hincrbyfloat(key, f"{name}:sum", max(0.0, value))


def _message(msg_id: str, fields: Mapping[str, str], deliveries: int) -> Message:
    """Parse a stream entry into a Message."""
    return Message(msg_id=msg_id, kind=fields.get("kind", ""), job_id=fields.get("job_id", ""),
                   generation=fields.get("generation", ""), chunk_id=int(fields.get("chunk_id", -1)),
                   start=int(fields.get("start", 0)), stop=int(fields.get("stop", 0)), deliveries=deliveries)


def dumps_options(options: Mapping[str, Any]) -> str:
    """Canonical JSON of job parameters (sorted keys, no spaces): the same request gives the same text."""
    return json.dumps(dict(options), sort_keys=True, separators=(",", ":"))
