"""Prometheus metrics at ``GET /metrics`` (prometheus-client), read from the ledger and
Redis at each scrape, so that every API process reports the same numbers and none is
lost when a process restarts. Label sets are bounded: models, methods, statuses, job
kinds, queue names, guard rules, evaluation suites and metrics, and the head
version's edited parameters.

| metric | type | labels |
|---|---|---|
| ``memedit_edits_total`` | counter | ``model``, ``method``, ``status`` (applied, rejected, failed, cancelled: the outcome an edit reached; applied stays counted after a rollback) |
| ``memedit_edits`` | gauge | ``model``, ``status`` (every status, now) |
| ``memedit_job_duration_seconds`` | histogram | ``kind`` (finished jobs, start to end) |
| ``memedit_queue_depth`` | gauge | ``model``, ``queue`` (reads, edits, evals) |
| ``memedit_head_version`` | gauge | ``model`` |
| ``memedit_layer_drift`` | gauge | ``model``, ``parameter`` (the head's ‖W − W₀‖_F / rows) |
| ``memedit_guard_rejections_total`` | counter | ``model``, ``rule`` |
| ``memedit_evaluation_score`` | gauge | ``model``, ``suite``, ``metric`` (the latest finished run) |
| ``memedit_evaluation_version`` | gauge | ``model``, ``suite`` (the version that run scored) |
| ``memedit_worker_up`` / ``memedit_worker_ready`` / ``memedit_workers`` | gauge | ``model`` |
| ``memedit_ledger_up`` / ``memedit_redis_up`` | gauge | — |
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import presence
from service.ledger import metrics as ledger_metrics
from service.settings import Settings

log = logging.getLogger(__name__)

# job durations (seconds): a read-sized job, an edit on a GPU, on a CPU, a long evaluation
BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class MemeditCollector:
    """Everything of the table above, read when Prometheus scrapes."""

    def __init__(self, sessions: Callable[[], Any], redis: Redis, settings: Settings) -> None:
        self.sessions = sessions
        self.redis = redis
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        ledger_up = GaugeMetricFamily("memedit_ledger_up", "the ledger database answered")
        try:
            session: Session
            with self.sessions() as session:
                numbers = ledger_metrics.read(session, BUCKETS)
        except SQLAlchemyError as exc:
            log.warning("metrics: the ledger did not answer (%s)", type(exc).__name__)
            ledger_up.add_metric([], 0)
            yield ledger_up
            numbers = None
        else:
            ledger_up.add_metric([], 1)
            yield ledger_up
            yield from _ledger_families(numbers)
        yield from self._redis_families(numbers.models if numbers else sorted(self.settings.models))

    def _redis_families(self, models: list[str]) -> Iterator[Metric]:
        up = GaugeMetricFamily("memedit_redis_up", "Redis answered")
        depth = GaugeMetricFamily(
            "memedit_queue_depth", "jobs waiting in a model's queue", labels=["model", "queue"]
        )
        worker_up = GaugeMetricFamily(
            "memedit_worker_up", "1 when a worker serves the model", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "memedit_worker_ready", "1 when the model's worker is ready", labels=["model"]
        )
        count = GaugeMetricFamily("memedit_workers", "live workers of the model", labels=["model"])
        ok = True
        for model in models:
            queues = {
                "reads": self.settings.read_queue(model),
                "edits": self.settings.edit_queue(model),
                "evals": self.settings.eval_queue(model),
            }
            try:
                for label, name in queues.items():
                    depth.add_metric([model, label], Queue(name, connection=self.redis).count)
            except RedisError:
                ok = False
                break
            worker = presence.model_worker(self.redis, self.settings.queue_prefix, model)
            if worker.state == presence.UNKNOWN:
                ok = False
                break
            worker_up.add_metric([model], 1 if worker.workers > 0 else 0)
            ready.add_metric([model], 1 if worker.ready else 0)
            count.add_metric([model], worker.workers)
        up.add_metric([], 1 if ok else 0)
        yield up
        if ok:
            yield from (depth, worker_up, ready, count)


def _ledger_families(n: ledger_metrics.LedgerNumbers) -> Iterator[Metric]:
    edits = CounterMetricFamily(
        "memedit_edits",
        "edits by the outcome they reached (applied stays counted after a rollback)",
        labels=["model", "method", "status"],
    )
    for (model, method, status), value in sorted(n.edit_outcomes.items()):
        edits.add_metric([model, method, status], value)
    yield edits
    now = GaugeMetricFamily("memedit_edits", "edits in each status now", labels=["model", "status"])
    for (model, status), value in sorted(n.edits_now.items()):
        now.add_metric([model, status], value)
    yield now
    durations = HistogramMetricFamily(
        "memedit_job_duration_seconds", "finished jobs, from start to end", labels=["kind"]
    )
    for kind, (cumulative, total, total_s) in sorted(n.durations.items()):
        buckets = [(_le(b), c) for b, c in zip(BUCKETS, cumulative, strict=True)]
        durations.add_metric([kind], [*buckets, ("+Inf", total)], total_s)
    yield durations
    head = GaugeMetricFamily("memedit_head_version", "the model's head version", labels=["model"])
    for model, number in sorted(n.head.items()):
        head.add_metric([model], number)
    yield head
    drift = GaugeMetricFamily(
        "memedit_layer_drift",
        "the head version's drift of each edited parameter: ||W - W0||_F / rows",
        labels=["model", "parameter"],
    )
    for (model, param), value in sorted(n.drift.items()):
        drift.add_metric([model, param], value)
    yield drift
    rejections = CounterMetricFamily(
        "memedit_guard_rejections", "updates the guard rejected, by rule", labels=["model", "rule"]
    )
    for (model, rule), value in sorted(n.rejections.items()):
        rejections.add_metric([model, rule], value)
    yield rejections
    scores = GaugeMetricFamily(
        "memedit_evaluation_score",
        "the latest finished run of each evaluation suite",
        labels=["model", "suite", "metric"],
    )
    versions = GaugeMetricFamily(
        "memedit_evaluation_version",
        "the version the latest run of each suite scored",
        labels=["model", "suite"],
    )
    seen: set[tuple[str, str]] = set()
    for (model, suite, metric), (value, version) in sorted(n.scores.items()):
        scores.add_metric([model, suite, metric], value)
        if (model, suite) not in seen:
            seen.add((model, suite))
            versions.add_metric([model, suite], version)
    yield scores
    yield versions


def _le(bound: float) -> str:
    return str(float(bound))


def registry_for(
    sessions: Callable[[], Any], redis: Redis, settings: Settings
) -> CollectorRegistry:
    """A registry holding only memedit's collector (no process metrics: several API
    processes behind one address would report different ones)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MemeditCollector(sessions, redis, settings))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
