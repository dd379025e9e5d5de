"""Prometheus metrics read from Redis at scrape time, so workers on any machine are counted."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import constants
from service.jobs.queue import JobQueue

logger = logging.getLogger(__name__)

__all__ = ["HTTP_BUCKETS_S", "HttpMetrics", "QueueCollector", "http_histogram"]

HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

_MAX_JOBS_SCANNED = 10_000


class QueueCollector(Collector):
    """Jobs by state, tiles/s, queue depth, workers, batch fill and the inference latency histogram."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Read the job index and the workers' counters."""
        try:
            yield from self._job_metrics()
            yield from self._worker_metrics()
        except redis.RedisError as err:
            logger.warning("metrics: redis unreachable: %s", err)
            up = GaugeMetricFamily("pixelcam_redis_up", "1 when Redis answered the scrape")
            up.add_metric([], 0.0)
            yield up

    def _job_metrics(self) -> Iterator[Metric]:
        rows = self.queue.states(self.queue.list_ids(_MAX_JOBS_SCANNED))
        by_state = dict.fromkeys(constants.JOB_STATES, 0)
        tiles_per_s = 0.0
        now = time.time()
        for row in rows:
            by_state[row["state"]] = by_state.get(row["state"], 0) + 1
            if row["state"] == constants.STATE_RUNNING and row.get("started_at"):
                elapsed = now - float(row["started_at"])
                if elapsed > 0:
                    tiles_per_s += int(row.get("tiles_done") or 0) / elapsed
        jobs = GaugeMetricFamily("pixelcam_jobs", "jobs by state", labels=["state"])
        for state, count in by_state.items():
            jobs.add_metric([state], float(count))
        yield jobs
        rate = GaugeMetricFamily("pixelcam_tiles_per_second", "tiles per second summed over running jobs")
        rate.add_metric([], tiles_per_s)
        yield rate
        waiting, working = self.queue.depth()
        depth = GaugeMetricFamily("pixelcam_queue_depth", "stream messages by status", labels=["status"])
        depth.add_metric(["waiting"], float(waiting))
        depth.add_metric(["in_progress"], float(working))
        yield depth
        alive = GaugeMetricFamily("pixelcam_workers_alive", "workers seen in the last minute")
        alive.add_metric([], float(self.queue.alive_workers()))
        yield alive
        up = GaugeMetricFamily("pixelcam_redis_up", "1 when Redis answered the scrape")
        up.add_metric([], 1.0)
        yield up

    def _worker_metrics(self) -> Iterator[Metric]:
        stats = self.queue.stats()
        batches = int(stats.get("batches", 0))
        tiles = CounterMetricFamily("pixelcam_tiles", "tiles inferred by all workers")
        tiles.add_metric([], float(stats.get("tiles", 0)))
        yield tiles
        fill = GaugeMetricFamily("pixelcam_batch_fill", "mean fraction of the batch size filled per inference batch")
        fill.add_metric([], float(stats.get("batch_fill_sum", 0.0)) / batches if batches else 0.0)
        yield fill
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound in constants.LATENCY_BUCKETS_S:
            cumulative += int(stats.get(f"latency_bucket:{bound}", 0))
            buckets.append((str(bound), float(cumulative)))
        cumulative += int(stats.get("latency_bucket:+Inf", 0))
        buckets.append(("+Inf", float(cumulative)))
        hist = HistogramMetricFamily("pixelcam_inference_latency_seconds", "onnxruntime time per batch")
        hist.add_metric([], buckets, sum_value=float(stats.get("latency_sum_s", 0.0)))
        yield hist
        outcomes = CounterMetricFamily("pixelcam_job_runs", "job runs that ended, by outcome", labels=["outcome"])
        for state in sorted(constants.TERMINAL_STATES):
            outcomes.add_metric([state], float(stats.get(f"jobs_outcome:{state}", 0)))
        yield outcomes
        runs = HistogramMetricFamily("pixelcam_job_seconds", "time from submission to the end of a job run, by "
                                     "outcome", labels=["outcome"])
        for state in sorted(constants.TERMINAL_STATES):
            runs.add_metric([state], *_buckets(stats, f"job_seconds:{state}"))
        yield runs
        wait = HistogramMetricFamily("pixelcam_queue_wait_seconds", "time from submission until a worker starts "
                                     "planning the job")
        wait.add_metric([], *_buckets(stats, "queue_wait_seconds"))
        yield wait


def _buckets(stats: dict[str, str], name: str) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets and the sum of a histogram kept as hash counters by `JobQueue`."""
    out, cumulative = [], 0
    for bound in (*constants.JOB_TIME_BUCKETS_S, "+Inf"):
        cumulative += int(stats.get(f"{name}:bucket:{bound}", 0))
        out.append((str(bound), float(cumulative)))
    return out, float(stats.get(f"{name}:sum", 0.0))


def http_histogram() -> Histogram:
    """The request-duration histogram (registered with an app's `QueueCollector` registry at startup)."""
    return Histogram("pixelcam_http_request_duration_seconds",
                     "HTTP request time until the response ended, by method, route template and status",
                     ["method", "route", "status"], registry=None, buckets=HTTP_BUCKETS_S)


class HttpMetrics:
    """ASGI middleware: observes every HTTP request's duration under its route template (`unmatched` when no
    route took it, e.g. a 401 or an unknown path), so the label set stays small whatever ids are asked for."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.histogram.labels(scope.get("method", ""), route, str(status)).observe(time.perf_counter() - t0)
