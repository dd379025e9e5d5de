"""The Redis queue mechanics on a real server: idempotent submit, chunks, reclaim, exactly-once finalize, cancel."""

from __future__ import annotations

import time

import pytest

from service import constants
from service.errors import JobConflict, JobNotFound
from service.jobs.queue import JobQueue, Message

pytestmark = pytest.mark.redis

FIELDS = {"slide_id": "a" * 64, "slide_file": "slides/x/slide.svs", "model": "m", "model_sha256": "b" * 64,
          "options": "{}", "mpp": ""}


def _drain(q: JobQueue, consumer: str) -> list[Message]:
    out = []
    while (msg := q.read(consumer, block_ms=10)) is not None:
        out.append(msg)
    return out


def _plan(q: JobQueue, job_id: str, ranges: list[range]) -> str:
    """Act as the worker that takes the plan message."""
    msg = q.read("planner", block_ms=10)
    assert msg is not None and msg.kind == constants.MSG_PLAN and msg.job_id == job_id
    assert q.transition(job_id, msg.generation, constants.STATE_QUEUED, constants.STATE_RUNNING, started_at=str(time.time()))
    assert q.enqueue_chunks(job_id, msg.generation, ranges)
    q.ack(msg)
    return msg.generation


def test_submit_is_idempotent_until_the_job_fails(queue: JobQueue) -> None:
    record, created = queue.submit("f" * 32, FIELDS)
    assert created and record["state"] == constants.STATE_QUEUED and record["generation"] == "1"
    again, created_again = queue.submit("f" * 32, FIELDS)
    assert not created_again and again["generation"] == "1"
    assert len(_drain(queue, "w")) == 1  # one plan message, not two
    assert queue.fail("f" * 32, "1", "boom")
    retried, created_retry = queue.submit("f" * 32, FIELDS)
    assert created_retry and retried["generation"] == "2" and retried["error"] == ""


def test_chunks_complete_once_and_finalize_is_enqueued_exactly_once(queue: JobQueue) -> None:
    job_id = "1" * 32
    queue.submit(job_id, FIELDS)
    gen = _plan(queue, job_id, [range(0, 4), range(4, 8), range(8, 10)])
    assert not queue.enqueue_chunks(job_id, gen, [range(0, 10)])  # a redone plan adds nothing
    chunks = _drain(queue, "w1")
    assert [(m.chunk_id, m.start, m.stop) for m in chunks] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    finals = []
    for msg in chunks:
        added, final = queue.complete_chunk(msg, msg.stop - msg.start)
        assert added
        finals.append(final)
    assert finals == [False, False, True]
    # a chunk redone after a crash counts nothing twice and queues no second finalize
    assert queue.complete_chunk(chunks[0], 4) == (False, False)
    job = queue.get(job_id)
    assert (job["tiles_done"], job["chunks_done"], job["tiles_total"]) == ("10", "3", "10")
    rest = _drain(queue, "w2")
    assert [m.kind for m in rest] == [constants.MSG_FINALIZE]
    assert queue.depth() == (0, 1)
    queue.ack(rest[0])
    assert queue.depth() == (0, 0)


def test_a_dead_workers_message_is_reclaimed_with_its_delivery_count(queue: JobQueue) -> None:
    job_id = "2" * 32
    queue.submit(job_id, FIELDS)
    _plan(queue, job_id, [range(0, 4)])
    first = queue.read("dies", block_ms=10)
    assert first is not None and first.chunk_id == 0
    assert queue.read("other", block_ms=10) is None  # not idle long enough yet
    time.sleep(queue.settings.claim_idle_s + 0.2)
    again = queue.read("other", block_ms=10)
    assert again is not None and again.msg_id == first.msg_id and again.deliveries == 2


def test_touch_keeps_a_busy_message_from_being_reclaimed(queue: JobQueue) -> None:
    job_id = "3" * 32
    queue.submit(job_id, FIELDS)
    _plan(queue, job_id, [range(0, 4)])
    msg = queue.read("busy", block_ms=10)
    assert msg is not None
    deadline = time.time() + queue.settings.claim_idle_s * 2
    while time.time() < deadline:
        queue.touch("busy", msg)
        assert queue.read("thief", block_ms=10) is None
        time.sleep(0.3)


def test_cancel_stops_finalize_and_refuses_finished_jobs(queue: JobQueue) -> None:
    job_id = "4" * 32
    queue.submit(job_id, FIELDS)
    _plan(queue, job_id, [range(0, 2), range(2, 4)])
    chunks = _drain(queue, "w")
    queue.complete_chunk(chunks[0], 2)
    assert queue.cancel(job_id)["state"] == constants.STATE_CANCELLED
    assert queue.complete_chunk(chunks[1], 2) == (True, False)  # no finalize for a cancelled job
    assert _drain(queue, "w") == []
    other = "5" * 32
    queue.submit(other, FIELDS)
    queue.fail(other, "1", "bad slide")
    with pytest.raises(JobConflict, match="already failed"):
        queue.cancel(other)


def test_messages_of_an_earlier_run_are_recognisable(queue: JobQueue) -> None:
    job_id = "6" * 32
    queue.submit(job_id, FIELDS)
    gen1 = _plan(queue, job_id, [range(0, 2)])
    stale = _drain(queue, "w")[0]
    queue.cancel(job_id)
    _, created = queue.submit(job_id, FIELDS)
    assert created
    assert queue.complete_chunk(stale, 2) == (False, False)
    assert queue.get(job_id)["generation"] != gen1
    assert queue.get(job_id)["tiles_done"] == "0"


def test_unknown_job_is_not_found(queue: JobQueue) -> None:
    with pytest.raises(JobNotFound, match="no job"):
        queue.get("0" * 32)


def test_a_dead_workers_message_behind_many_live_ones_is_found(queue: JobQueue) -> None:
    queue.settings = queue.settings.model_copy(update={"chunks_in_flight": 64})  # all 30 chunks on the stream
    job_id = "7" * 32
    queue.submit(job_id, FIELDS)
    _plan(queue, job_id, [range(i, i + 1) for i in range(30)])
    live = [m for _ in range(25) if (m := queue.read("live", block_ms=10)) is not None]
    dead = queue.read("dead", block_ms=10)
    assert dead is not None and len(live) == 25
    for _ in range(2):  # the live worker keeps its 25 messages fresh while the dead one's goes stale
        time.sleep(queue.settings.claim_idle_s / 2 + 0.1)
        for msg in live:
            queue.touch("live", msg)
    got = [queue.read("thief", block_ms=10) for _ in range(4)]
    assert dead.msg_id in [m.msg_id for m in got if m is not None]


def test_jobs_take_turns_so_a_huge_backlog_never_blocks_a_small_job(queue: JobQueue) -> None:
    """A job keeps at most `chunks_in_flight` messages queued; each finished chunk queues its next one at the end
    of the stream, so a small job submitted behind a 200-chunk job waits for a few chunks, not for 200."""
    window = queue.settings.chunks_in_flight
    huge, small = "1" * 32, "2" * 32
    queue.submit(huge, FIELDS)
    queue.submit(small, {**FIELDS, "slide_id": "c" * 64})
    _plan(queue, huge, [range(i, i + 1) for i in range(200)])
    _plan(queue, small, [range(0, 1), range(1, 2)])
    assert queue.depth()[0] == window + 2  # the huge job's backlog waits in its own list
    served: list[str] = []
    while (msg := queue.read("w", block_ms=10)) is not None:  # one worker, taking messages in stream order
        if msg.kind == constants.MSG_CHUNK:
            served.append(msg.job_id)
            queue.complete_chunk(msg, 1, "w")
        else:
            queue.ack(msg)
    assert served.count(huge) == 200 and served.count(small) == 2  # every chunk ran exactly once
    last_small = max(i for i, j in enumerate(served) if j == small)
    assert last_small <= window + 1, served[: window + 4]  # before: 201 (every huge chunk first)
    assert queue.get(huge)["chunks_done"] == "200" and queue.get(small)["chunks_done"] == "2"


def test_a_run_is_counted_once_when_it_ends_not_when_its_fields_change(queue: JobQueue) -> None:
    job_id = "3" * 32
    queue.submit(job_id, FIELDS)
    generation = _plan(queue, job_id, [range(0, 1)])
    assert queue.fail(job_id, generation, "boom")
    queue.set_fields(job_id, generation, note="x")  # a field written after the end: the state does not change
    stats = queue.stats()
    assert stats["jobs_outcome:failed"] == "1" and stats["queue_wait_seconds:bucket:1.0"] == "1"
    assert sum(int(v) for k, v in stats.items() if k.startswith("job_seconds:failed:bucket:")) == 1
