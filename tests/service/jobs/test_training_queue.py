"""The training queue on a real Redis: one trainer per job, leases that expire into a failed job with the reason
(found by a sweep or by the API), a registered model that survives its trainer's death, cancel against finish."""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service import constants
from service.api import create_app
from service.errors import JobConflict
from service.jobs.storage import ModelRegistry
from service.jobs.training_queue import TrainingQueue, models_tmp_prefix, sweep_dead_trainers
from service.settings import Settings
from tests.service.shell import make_settings

pytestmark = pytest.mark.redis

LEASE_S = 1.0


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str, shell_models_dir: Path) -> Settings:
    return make_settings(tmp_path, redis_url, shell_models_dir, trainer_lease_s=LEASE_S, heartbeat_s=0.2)


@pytest.fixture()
def tq(redis_client: redis.Redis, settings: Settings) -> Iterator[TrainingQueue]:
    q = TrainingQueue(redis_client, settings)
    q.ensure_group()
    yield q
    for key in redis_client.scan_iter(f"{settings.redis_prefix}:*"):
        redis_client.delete(key)


def _queued(tq: TrainingQueue, name: str = "m1") -> str:
    training_id = uuid.uuid4().hex
    assert tq.reserve_name(name, training_id)
    tq.submit(training_id, {"name": name, "slides": "4"}, owner=constants.ANONYMOUS)
    return training_id


def test_one_trainer_takes_a_job_and_renews_its_lease(tq: TrainingQueue, settings: Settings) -> None:
    training_id = _queued(tq)
    msg = tq.read("t1", block_ms=100)
    assert msg is not None and msg.training_id == training_id
    assert tq.read("t2", block_ms=100) is None  # one message, one trainer
    assert tq.start(training_id, "t1", msg)
    assert not tq.start(training_id, "t2", msg)  # already running
    assert tq.lease_holder(training_id) == "t1"
    models = ModelRegistry(settings.models_dir)
    for _ in range(6):  # 1.2 s > the lease: renewing keeps it
        time.sleep(0.2)
        assert tq.renew(training_id, "t1", msg) == constants.STATE_RUNNING
        assert sweep_dead_trainers(tq, models) == []
    assert tq.publish(training_id, "t1", stage="baseline", progress="0.3")
    assert not tq.publish(training_id, "t2", stage="evil")  # only the job's own trainer writes its progress
    assert tq.get(training_id)["stage"] == "baseline"
    assert tq.finish(training_id, "t1", constants.STATE_FAILED, error="boom")
    assert not tq.finish(training_id, "t1", constants.STATE_DONE)  # ended once
    assert tq.get(training_id)["state"] == "failed" and tq.running_ids() == []
    assert tq.redis.xlen(tq.stream) == 0  # the message went with the job
    assert tq.reserve_name("m1", uuid.uuid4().hex)  # the name is free again


def test_an_expired_lease_fails_the_job_with_the_reason_and_clears_its_temporary_model(
        tq: TrainingQueue, settings: Settings) -> None:
    training_id = _queued(tq)
    msg = tq.read("t1", block_ms=100)
    assert msg is not None and tq.start(training_id, "t1", msg)
    settings.models_dir.mkdir(exist_ok=True)
    tmp = settings.models_dir / f"{models_tmp_prefix(training_id)}abc.onnx.tmp"
    tmp.write_bytes(b"half a model")
    models = ModelRegistry(settings.models_dir)
    time.sleep(LEASE_S + 0.3)  # t1 died: nobody renews
    assert sweep_dead_trainers(tq, models) == [training_id]
    job = tq.get(training_id)
    assert job["state"] == "failed" and "trainer t1 stopped without finishing" in job["error"]
    assert "resubmit" in job["error"] and not tmp.exists()
    assert tq.renew(training_id, "t1", msg) == "failed"  # a trainer that comes back learns it lost the job
    assert not tq.begin_finish(training_id, "t1")
    assert sweep_dead_trainers(tq, models) == []


def test_a_trainer_that_died_after_registering_its_model_leaves_a_done_job(tq: TrainingQueue,
                                                                            settings: Settings,
                                                                            shell_model_path: Path) -> None:
    training_id = _queued(tq, "registered")
    msg = tq.read("t1", block_ms=100)
    assert msg is not None and tq.start(training_id, "t1", msg)
    assert tq.begin_finish(training_id, "t1")
    shutil.copyfile(shell_model_path, settings.models_dir / "registered.onnx")
    sha = hashlib.sha256((settings.models_dir / "registered.onnx").read_bytes()).hexdigest()
    tq.publish(training_id, "t1", model_sha256=sha)
    with pytest.raises(JobConflict, match="registering its model"):
        tq.cancel(training_id)
    time.sleep(LEASE_S + 0.3)
    assert sweep_dead_trainers(tq, ModelRegistry(settings.models_dir)) == [training_id]
    job = tq.get(training_id)
    assert job["state"] == "done" and job["model"] == "registered" and not job["error"]


def test_cancel_beats_a_later_finish_and_a_finish_beats_a_later_cancel(tq: TrainingQueue) -> None:
    first = _queued(tq, "a")
    msg = tq.read("t1", block_ms=100)
    assert msg is not None and tq.start(first, "t1", msg)
    assert tq.cancel(first)["state"] == "cancelled"
    assert tq.renew(first, "t1", msg) == "cancelled"
    assert not tq.begin_finish(first, "t1") and not tq.finish(first, "t1", constants.STATE_DONE)
    second = _queued(tq, "b")
    msg2 = tq.read("t1", block_ms=100)
    assert msg2 is not None and tq.start(second, "t1", msg2)
    assert tq.finish(second, "t1", constants.STATE_DONE, model="b")
    with pytest.raises(JobConflict, match="already done"):
        tq.cancel(second)
    queued = _queued(tq, "c")
    assert tq.cancel(queued)["state"] == "cancelled"  # before any trainer saw it
    msg3 = tq.read("t1", block_ms=100)
    assert msg3 is not None and not tq.start(queued, "t1", msg3)  # a trainer reading it later does nothing


def test_the_message_of_a_trainer_that_died_before_starting_is_taken_by_the_next(tq: TrainingQueue) -> None:
    training_id = _queued(tq)
    assert tq.read("t1", block_ms=100) is not None  # read, then t1 died before it started the job
    assert tq.read("t2", block_ms=100) is None
    time.sleep(LEASE_S + 0.2)
    again = tq.read("t2", block_ms=100)
    assert again is not None and again.training_id == training_id and again.deliveries == 2
    assert tq.start(training_id, "t2", again)


def test_the_api_fails_a_running_job_whose_trainer_is_gone_when_asked_about_it(settings: Settings,
                                                                               tq: TrainingQueue) -> None:
    training_id = _queued(tq)
    msg = tq.read("t1", block_ms=100)
    assert msg is not None and tq.start(training_id, "t1", msg)
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/v1/training-jobs/{training_id}").json()["state"] == "running"
        time.sleep(LEASE_S + 0.3)
        job = client.get(f"/v1/training-jobs/{training_id}").json()
        assert job["state"] == "failed" and "trainer t1 stopped without finishing" in job["error"]
        assert client.get("/readyz").json()["checks"]["trainers"] == "0 alive"
