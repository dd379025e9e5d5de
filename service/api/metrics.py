"""Prometheus metrics read from Redis at scrape time, so workers on any machine are counted."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service import constants
from service.jobs.queue import JobQueue

logger = logging.getLogger(__name__)

__all__ = ["QueueCollector"]

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
