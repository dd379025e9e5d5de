"""Training jobs in Redis: a hash per job, a Redis Stream of job ids with its own consumer group of trainers, and a
lease per running job.

A trainer takes one message at a time (XREADGROUP), moves the job from queued to running and holds a lease on it
(a key with a time to live, renewed twice a second while the recipe runs; the message is re-claimed at the same
time). A trainer that dies stops renewing: once the lease has expired (`PIXELCAM_TRAINER_LEASE_S`) the job is
failed with the reason by whoever looks first: any trainer, between jobs, sweeps the running set; the API checks
the lease of a running job whenever it is asked about it. A trainer that died after its model was registered
leaves a done job instead (the registered file's checksum is in the job). Every change of state is one Lua script,
so a cancel, a finish and a sweep can never both win.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from service import constants
from service.analysis.plan import file_sha256
from service.errors import JobConflict, NotFoundError
from service.jobs.storage import ModelRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["TrainingJobNotFound", "TrainingMessage", "TrainingQueue", "sweep_dead_trainers", "models_tmp_prefix",
           "remove_models_tmp", "loads_json"]


class TrainingJobNotFound(NotFoundError):
    """No training job has this id (or it belongs to another key)."""


# KEYS: job, lease, running set. ARGV: trainer, lease ms, now, message id, training id.
_START = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'trainer', ARGV[1], 'started_at', ARGV[3], 'heartbeat_at', ARGV[3],
           'msg_id', ARGV[4])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# KEYS: job, lease. ARGV: trainer, lease ms, now. Returns the job's state (empty when it is gone).
_RENEW = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'running' and redis.call('HGET', KEYS[1], 'trainer') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[3])
end
return state
"""

# KEYS: job. ARGV: trainer, then field/value pairs. Only the running job's own trainer writes its progress.
_PUBLISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'trainer') ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: job. ARGV: trainer. From here on the job cannot be cancelled: its model is being registered.
_BEGIN_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'trainer') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'finishing', '1')
return 1
"""

# KEYS: job, lease, running set, name reservation, stream. ARGV: mode ('trainer' | 'sweep'), trainer, group,
# new state, now, training id, then field/value pairs.
# trainer: the job must be running under this trainer. sweep: it must be running with its lease expired.
_END = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if ARGV[1] == 'trainer' and redis.call('HGET', KEYS[1], 'trainer') ~= ARGV[2] then return 0 end
if ARGV[1] == 'sweep' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished_at', ARGV[5])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[6])
if redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
local msg = redis.call('HGET', KEYS[1], 'msg_id')
if msg and msg ~= '' then
  redis.call('XACK', KEYS[5], ARGV[3], msg); redis.call('XDEL', KEYS[5], msg)
end
return 1
"""

# KEYS: job, lease, running set, name reservation. ARGV: now, training id.
# Returns 1 cancelled, 0 already ended (or gone), 2 registering its model (too late to cancel).
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'finishing') == '1' then return 2 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[4]) == ARGV[2] then redis.call('DEL', KEYS[4]) end
return 1
"""


@dataclass(frozen=True)
class TrainingMessage:
    """One training message as a trainer receives it."""

    msg_id: str
    training_id: str
    deliveries: int = 1


def models_tmp_prefix(training_id: str) -> str:
    """The name prefix of a training job's temporary files in the models directory (never `*.onnx`)."""
    return f".training-{training_id}-"


class TrainingQueue:
    """Training job records, their stream and their leases, under the settings' key prefix."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.stream = settings.key(constants.TRAINING_STREAM_KEY)
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._publish = client.register_script(_PUBLISH)
        self._begin_finish = client.register_script(_BEGIN_FINISH)
        self._end = client.register_script(_END)
        self._cancel = client.register_script(_CANCEL)

    # --- keys -------------------------------------------------------------------------------------------------
    def key(self, training_id: str) -> str:
        """The hash of one training job."""
        return self.settings.key(constants.TRAINING_KEY, training_id=training_id)

    def lease_key(self, training_id: str) -> str:
        """The running job's lease (its trainer's name; expires unless renewed)."""
        return self.settings.key(constants.TRAINING_LEASE_KEY, training_id=training_id)

    def name_key(self, name: str) -> str:
        """Which unfinished training job will register the model `name`."""
        return self.settings.key(constants.TRAINING_NAME_KEY, model=name)

    def owner_key(self, key_id: str) -> str:
        """The training jobs one API key created."""
        return self.settings.key(constants.OWNER_TRAININGS_KEY, key_id=key_id)

    @property
    def running_key(self) -> str:
        return self.settings.key(constants.TRAINING_RUNNING_KEY)

    def _end_keys(self, training_id: str, record: Mapping[str, str]) -> list[str]:
        return [self.key(training_id), self.lease_key(training_id), self.running_key,
                self.name_key(record.get("name", "")), self.stream]

    # --- setup and submit -------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the training stream and its consumer group if they do not exist."""
        try:
            self.redis.xgroup_create(self.stream, constants.TRAINING_GROUP_NAME, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def reserve_name(self, name: str, training_id: str) -> bool:
        """Claim a model name for this job until it ends; False when another unfinished job has it."""
        return bool(self.redis.set(self.name_key(name), training_id, nx=True))

    def release_name(self, name: str, training_id: str) -> None:
        """Give a name back (a submit that failed after reserving it)."""
        if self.redis.get(self.name_key(name)) == training_id:
            self.redis.delete(self.name_key(name))

    def submit(self, training_id: str, fields: Mapping[str, str], owner: str) -> dict[str, str]:
        """Create the job record, index it (and under its key) and queue its message, in one transaction."""
        now = f"{time.time():.3f}"
        record: dict[Any, Any] = {**fields, "training_id": training_id, "state": constants.STATE_QUEUED, "owner": owner,
                  "created_at": now, "started_at": "", "finished_at": "", "error": "", "stage": "", "progress": "0",
                  "metrics": "{}", "model": "", "model_sha256": "", "trainer": "", "msg_id": ""}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(training_id), mapping=record)
            pipe.zadd(self.settings.key(constants.TRAINING_INDEX_KEY), {training_id: float(now)})
            pipe.zadd(self.owner_key(owner), {training_id: float(now)})
            pipe.xadd(self.stream, {"training_id": training_id})
            pipe.execute()
        logger.info("training job %s queued (model name %s)", training_id, fields.get("name", ""))
        return record

    # --- reading ----------------------------------------------------------------------------------------------
    def get(self, training_id: str) -> dict[str, str]:
        """The job's hash; TrainingJobNotFound when there is none."""
        record: dict[str, str] = self.redis.hgetall(self.key(training_id))  # type: ignore[assignment]
        if not record:
            raise TrainingJobNotFound(f"no training job {training_id!r}; list them with GET /v1/training-jobs")
        return record

    def list_ids(self, owner: str | None, limit: int) -> list[str]:
        """The most recent training ids, newest first: every job (owner None) or one key's."""
        key = self.settings.key(constants.TRAINING_INDEX_KEY) if owner is None else self.owner_key(owner)
        return [str(i) for i in self.redis.zrevrange(key, 0, limit - 1)]  # type: ignore[union-attr]

    def records(self, training_ids: Iterable[str]) -> list[dict[str, str]]:
        """The hashes of many jobs in one round trip (gone ones left out)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for training_id in training_ids:
                pipe.hgetall(self.key(training_id))
            rows: list[dict[str, str]] = pipe.execute()
        return [r for r in rows if r]

    # --- the trainer's side -----------------------------------------------------------------------------------
    def read(self, consumer: str, block_ms: int) -> TrainingMessage | None:
        """The next message: one whose trainer died (idle longer than the lease) first, else a new one."""
        group = constants.TRAINING_GROUP_NAME
        claimed: Any = self.redis.xautoclaim(self.stream, group, consumer, start_id="0-0", count=1,
                                             min_idle_time=int(self.settings.trainer_lease_s * 1000))
        entries = claimed[1] if claimed else []
        if entries and entries[0][1]:
            msg_id, fields = entries[0]
            pending: Any = self.redis.xpending_range(self.stream, group, min=msg_id, max=msg_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            logger.warning("trainer %s reclaimed training message %s (job %s, %d deliveries)", consumer, msg_id,
                           fields.get("training_id"), deliveries)
            return TrainingMessage(msg_id, str(fields.get("training_id", "")), deliveries)
        reply: Any = self.redis.xreadgroup(group, consumer, {self.stream: ">"}, count=1, block=block_ms)
        if not reply:
            return None
        msg_id, fields = reply[0][1][0]
        return TrainingMessage(msg_id, str(fields.get("training_id", "")))

    def ack(self, msg: TrainingMessage) -> None:
        """Acknowledge and delete a message."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, constants.TRAINING_GROUP_NAME, msg.msg_id)
            pipe.xdel(self.stream, msg.msg_id)
            pipe.execute()

    def start(self, training_id: str, trainer: str, msg: TrainingMessage) -> bool:
        """queued -> running under this trainer, with a fresh lease; False when the job is not queued."""
        args: list[Any] = [trainer, int(self.settings.trainer_lease_s * 1000), f"{time.time():.3f}", msg.msg_id,
                           training_id]
        return bool(self._start(keys=[self.key(training_id), self.lease_key(training_id), self.running_key],
                                args=args))

    def renew(self, training_id: str, trainer: str, msg: TrainingMessage | None = None) -> str:
        """Renew this trainer's lease (and its claim on the message); returns the job's state ('' when gone)."""
        state = self._renew(keys=[self.key(training_id), self.lease_key(training_id)],
                            args=[trainer, int(self.settings.trainer_lease_s * 1000), f"{time.time():.3f}"])
        if msg is not None and state == constants.STATE_RUNNING:
            self.redis.xclaim(self.stream, constants.TRAINING_GROUP_NAME, trainer, min_idle_time=0,
                              message_ids=[msg.msg_id], justid=True)
        return str(state)

    def publish(self, training_id: str, trainer: str, **fields: str) -> bool:
        """Write progress fields of a job this trainer runs."""
        args: list[str] = [trainer]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._publish(keys=[self.key(training_id)], args=args))

    def begin_finish(self, training_id: str, trainer: str) -> bool:
        """Mark the job as registering its model (no cancel from now on); False when it is no longer ours."""
        return bool(self._begin_finish(keys=[self.key(training_id)], args=[trainer]))

    def finish(self, training_id: str, trainer: str, state: str, **fields: str) -> bool:
        """End a job this trainer runs: done or failed, with fields (model, error...)."""
        return self._run_end("trainer", training_id, trainer, state, fields)

    def _run_end(self, mode: str, training_id: str, trainer: str, state: str, fields: Mapping[str, str]) -> bool:
        record = self.redis.hgetall(self.key(training_id))
        if not record:
            return False
        args: list[Any] = [mode, trainer, constants.TRAINING_GROUP_NAME, state, f"{time.time():.3f}", training_id]
        for name, value in fields.items():
            args += [name, value]
        moved = bool(self._end(keys=self._end_keys(training_id, record), args=args))  # type: ignore[arg-type]
        if moved:
            log = logger.error if state == constants.STATE_FAILED else logger.info
            log("training job %s %s%s", training_id, state, f": {fields['error']}" if fields.get("error") else "")
        return moved

    # --- the API's side ---------------------------------------------------------------------------------------
    def cancel(self, training_id: str) -> dict[str, str]:
        """Cancel a queued or running job (its trainer stops the recipe within a second); 409 once it ended or
        while it registers its model."""
        record = self.get(training_id)
        if record["state"] == constants.STATE_CANCELLED:
            return record
        code = int(self._cancel(keys=[self.key(training_id), self.lease_key(training_id), self.running_key,
                                      self.name_key(record.get("name", ""))],
                                args=[f"{time.time():.3f}", training_id]))
        if code == 2:
            raise JobConflict(f"training job {training_id} has finished training and is registering its model; "
                              "it is done in a moment (delete the model if you do not want it)")
        if code == 0:
            now = self.get(training_id)
            if now["state"] == constants.STATE_CANCELLED:
                return now
            raise JobConflict(f"training job {training_id} is already {now['state']}; only queued or running "
                              "training jobs can be cancelled")
        logger.info("training job %s cancelled", training_id)
        return self.get(training_id)

    def delete(self, training_id: str) -> dict[str, str]:
        """Forget an ended job (its record and index entries); the caller removes its folder."""
        record = self.get(training_id)
        if record["state"] not in constants.TERMINAL_STATES:
            raise JobConflict(f"training job {training_id} is {record['state']}; cancel it first "
                              f"(POST /v1/training-jobs/{training_id}/cancel), then delete it")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(training_id), self.lease_key(training_id))
            pipe.zrem(self.settings.key(constants.TRAINING_INDEX_KEY), training_id)
            pipe.zrem(self.owner_key(record.get("owner", constants.ANONYMOUS)), training_id)
            pipe.srem(self.running_key, training_id)
            pipe.execute()
        return record

    def mark_alive(self, trainer: str) -> None:
        """Say that this trainer is alive (for /readyz and the hint on queued jobs)."""
        self.redis.zadd(self.settings.key(constants.TRAINERS_KEY), {trainer: time.time()})

    def alive_trainers(self) -> int:
        """Trainers seen within `WORKER_ALIVE_TTL_S`."""
        key = self.settings.key(constants.TRAINERS_KEY)
        self.redis.zremrangebyscore(key, "-inf", time.time() - 100 * constants.WORKER_ALIVE_TTL_S)
        return int(self.redis.zcount(key, time.time() - constants.WORKER_ALIVE_TTL_S, "+inf"))

    def slide_users(self, slide_id: str | None = None) -> dict[str, tuple[str, set[str]]]:
        """Unfinished training jobs (queued or running): id -> (owner key id, the slide ids they train on); only
        those using `slide_id` when it is given. A slide they use must stay on the storage until they end."""
        ids = self.list_ids(None, 10_000_000)
        with self.redis.pipeline(transaction=False) as pipe:
            for training_id in ids:
                pipe.hmget(self.key(training_id), ["state", "owner", "slide_ids"])
            rows = pipe.execute()
        out = {}
        for training_id, (state, owner, slide_ids) in zip(ids, rows, strict=True):
            used = set(str(slide_ids or "").split(",")) - {""}
            if state in (constants.STATE_QUEUED, constants.STATE_RUNNING) and (slide_id is None or slide_id in used):
                out[training_id] = (str(owner or ""), used)
        return out

    def ended_before(self, cutoff_s: float) -> list[str]:
        """Ids of the training jobs that ended (done, failed, cancelled) before `cutoff_s` (for retention)."""
        ids = self.list_ids(None, 10_000_000)
        with self.redis.pipeline(transaction=False) as pipe:
            for training_id in ids:
                pipe.hmget(self.key(training_id), ["state", "finished_at"])
            rows = pipe.execute()
        return [t for t, (state, finished) in zip(ids, rows, strict=True)
                if state in constants.TERMINAL_STATES and finished and float(finished) < cutoff_s]

    def lease_holder(self, training_id: str) -> str | None:
        """The trainer holding the job's lease, None when there is no live lease."""
        holder = self.redis.get(self.lease_key(training_id))
        return str(holder) if holder else None

    def running_ids(self) -> list[str]:
        """The ids of every running training job."""
        return sorted(str(i) for i in self.redis.smembers(self.running_key))  # type: ignore[union-attr]

    def sweep_end(self, training_id: str, state: str, **fields: str) -> bool:
        """End a running job whose lease expired (a dead trainer's); False when its lease is alive or it ended."""
        return self._run_end("sweep", training_id, "", state, fields)


def sweep_dead_trainers(queue: TrainingQueue, models: ModelRegistry, training_ids: Iterable[str] | None = None) -> list[str]:
    """Fail every running job (of `training_ids`, default all) whose trainer's lease has expired; returns their ids.

    Each one's temporary files in the models directory are removed. A trainer that died after its model was
    registered (the file is there with the checksum the job recorded) leaves a done job instead.
    """
    ended = []
    for training_id in queue.running_ids() if training_ids is None else training_ids:
        if queue.lease_holder(training_id) is not None:
            continue
        try:
            record = queue.get(training_id)
        except TrainingJobNotFound:
            queue.redis.srem(queue.running_key, training_id)
            continue
        if record.get("state") != constants.STATE_RUNNING:
            queue.redis.srem(queue.running_key, training_id)
            continue
        remove_models_tmp(models.root, training_id)
        name, sha = record.get("name", ""), record.get("model_sha256", "")
        path = models.root / f"{name}.onnx"
        if record.get("finishing") == "1" and sha and path.is_file() and file_sha256(path) == sha:
            if queue.sweep_end(training_id, constants.STATE_DONE, model=name, progress="1", finishing="0"):
                ended.append(training_id)
            continue
        heard = float(record.get("heartbeat_at") or record.get("started_at") or time.time())
        reason = (f"its trainer {record.get('trainer') or '?'} stopped without finishing (last heard from "
                  f"{max(0.0, time.time() - heard):.0f} s ago: killed, out of memory, or its machine went down); "
                  "the run was abandoned and no model was registered; resubmit the training job")
        if queue.sweep_end(training_id, constants.STATE_FAILED, error=reason):
            ended.append(training_id)
    return ended


def remove_models_tmp(models_root: Path, training_id: str) -> int:
    """Delete a training job's temporary files in the models directory; returns how many there were."""
    removed = 0
    if Path(models_root).is_dir():
        for path in Path(models_root).glob(models_tmp_prefix(training_id) + "*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def loads_json(text: str | None, default: Any) -> Any:
    """A JSON field of a record, or the default when it is empty or unreadable."""
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default
