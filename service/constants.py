"""Redis key names, queue names, job states and default timings of the service shell (one place, as arq does)."""

from __future__ import annotations

from typing import Final

# Every key lives under a prefix (settings.redis_prefix) so that several deployments or test runs can share
# one Redis server. The names below are the part after "<prefix>:".
STREAM_KEY: Final = "stream"  # Redis Stream of work messages (plan, chunk, finalize); never pixels
GROUP_NAME: Final = "workers"  # the one consumer group every worker joins
JOBS_INDEX_KEY: Final = "jobs"  # sorted set: job_id -> created_at (s)
JOB_KEY: Final = "job:{job_id}"  # hash: state, counts, timings, model, parameters, error
JOB_DONE_KEY: Final = "job:{job_id}:done:{generation}"  # set of finished chunk ids for one run of the job
JOB_FAILURES_KEY: Final = "job:{job_id}:failures:{generation}"  # hash: chunk id -> failed attempts
JOB_WORKERS_KEY: Final = "job:{job_id}:workers:{generation}"  # hash: worker name -> chunks it finished
JOB_FINALIZE_FLAG_KEY: Final = "job:{job_id}:finalize:{generation}"  # SET NX: the finalize message went out
JOB_PENDING_KEY: Final = "job:{job_id}:pending:{generation}"  # list: chunks not yet on the stream (fairness)
STATS_KEY: Final = "stats"  # hash: counters the workers publish for /metrics
WORKERS_KEY: Final = "workers:alive"  # sorted set: consumer name -> last heartbeat (s)
TRAINERS_KEY: Final = "trainers:alive"  # sorted set: trainer name -> last time it was seen (s)
OWNER_SLIDES_KEY: Final = "owner:{key_id}:slides"  # set: slide ids uploaded with one API key
OWNER_JOBS_KEY: Final = "owner:{key_id}:jobs"  # sorted set: job_id -> created_at (s), jobs submitted with one key
OWNER_ACTIVE_KEY: Final = "owner:{key_id}:active"  # set: that key's jobs not yet seen finished
ANONYMOUS: Final = "anonymous"  # the key id of requests to an open API (no keys configured)
# Training jobs (service.jobs.training): their own stream and consumer group, one job at a time per trainer.
TRAINING_STREAM_KEY: Final = "training-stream"  # Redis Stream of training job ids (one message per job)
TRAINING_GROUP_NAME: Final = "trainers"  # the consumer group every trainer joins
TRAINING_INDEX_KEY: Final = "training-jobs"  # sorted set: training id -> created_at (s)
TRAINING_KEY: Final = "training-job:{training_id}"  # hash: state, stage, epoch, progress, metrics, model, error
TRAINING_LEASE_KEY: Final = "training-job:{training_id}:lease"  # trainer name, expires unless renewed
TRAINING_RUNNING_KEY: Final = "training-running"  # set: training ids in state running (what a sweep looks at)
TRAINING_NAME_KEY: Final = "training-name:{model}"  # the training id that will register this model name
OWNER_TRAININGS_KEY: Final = "owner:{key_id}:training-jobs"  # sorted set: training id -> created_at, per key

# Message kinds on the stream.
MSG_PLAN: Final = "plan"
MSG_CHUNK: Final = "chunk"
MSG_FINALIZE: Final = "finalize"

# Job states.
STATE_QUEUED: Final = "queued"
STATE_RUNNING: Final = "running"
STATE_STITCHING: Final = "stitching"
STATE_DONE: Final = "done"
STATE_FAILED: Final = "failed"
STATE_CANCELLED: Final = "cancelled"
JOB_STATES: Final = (STATE_QUEUED, STATE_RUNNING, STATE_STITCHING, STATE_DONE, STATE_FAILED, STATE_CANCELLED)
TRAINING_STATES: Final = (STATE_QUEUED, STATE_RUNNING, STATE_DONE, STATE_FAILED, STATE_CANCELLED)
TERMINAL_STATES: Final = frozenset({STATE_DONE, STATE_FAILED, STATE_CANCELLED})

# Default timings (seconds unless the name says otherwise); settings may override them.
CLAIM_IDLE_S: Final = 60.0  # a message unacknowledged this long belongs to a dead worker and is reclaimed
HEARTBEAT_S: Final = 10.0  # a running worker refreshes its message's idle time this often
BLOCK_MS: Final = 1000  # how long XREADGROUP waits for new messages
REDIS_TIMEOUT_S: Final = 30.0  # any Redis reply (workers add their blocking read time on top)
MAX_ATTEMPTS: Final = 3  # deliveries/failures of one message before the job is marked failed
EVENTS_POLL_S: Final = 0.5  # how often the server-sent-event stream looks at the job
WORKER_ALIVE_TTL_S: Final = 60.0  # a worker not seen for this long is not counted as alive
TRAINER_LEASE_S: Final = 60.0  # a running training job whose trainer has not renewed its lease this long is failed
TRAINING_POLL_S: Final = 0.5  # how often a trainer reads the recipe's progress.json and the job's state
TRAINING_STOP_GRACE_S: Final = 10.0  # SIGTERM to the recipe's process group, then SIGKILL after this long

# Upload and storage.
UPLOAD_CHUNK_BYTES: Final = 1 << 20
# A slide whose smallest pyramid level is bigger than this has no overview to find tissue on cheaply: refused at
# upload (a decompression bomb declares gigantic dimensions with a few kilobytes of data).
MAX_OVERVIEW_PX: Final = 1_000_000_000
SLIDES_DIR: Final = "slides"
JOBS_DIR: Final = "jobs"
TRAINING_DIR: Final = "training"  # <storage>/training/<training id>/: request, manifest, config, the recipe's run
MODELS_DIR: Final = "models"
REDIS_DIR: Final = "redis"
DEMO_MODEL_NAME: Final = "pixelcam-glas-lite0-s5"  # model/weights/<name>.onnx, served when nothing else is chosen
DEFAULT_MODEL_FILE: Final = "DEFAULT"  # inside the models dir: the name of the default model, one line

# Histogram buckets (seconds) of the inference latency per batch, shared by workers and /metrics.
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# job run time (created -> ended) and queue wait (created -> a worker starts planning), seconds
JOB_TIME_BUCKETS_S: Final = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)
