"""Chaos, bounded, on the tiny model (bench/_chaos.py runs it; bench/chaos.py is the
same run at scale): three clients stream single edits, each POST retried with its
``Idempotency-Key`` until accepted, while the worker is SIGKILLed three times,
PostgreSQL (an embedded one of the test's own) is restarted once and Redis is
flushed once, last.

Checked: every edit ended applied (the guard is off), none stuck and none applied
twice, versions contiguous; the jobs left at the flush finished within 60 s under
the same worker; the head's tensor hashes equal an uninterrupted run of the same
requests in the ledger's order; a rollback to a random version is hash-exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from bench._chaos import Ledger, Schedule, run
from service.settings import GuardPolicy, ModelSpec, Settings
from tests.served import serve
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL, TWIN = "tiny", "twin"
N = 24
FAST = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16,
        "v_num_grad_steps": 5}  # fmt: skip
NAMES = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin", "Tolstoy", "Homer",
         "Dante", "Ada", "Alan", "John", "Mary", "Marie", "Peter", "Anna"]  # fmt: skip
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo", "Vienna", "Lisbon", "Athens"]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    own = Ledger(tmp_path / "pg")
    try:
        yield own
    finally:
        own.close()


def tiny_requests(n: int) -> list[dict[str, Any]]:
    return [
        {"prompt": "{} was born in", "subject": f"{NAMES[i % 16]} {NAMES[(i // 16 + 3) % 16]}",
         "target_new": CITIES[i % len(CITIES)]}
        for i in range(n)
    ]  # fmt: skip


def memit_alone(req: dict[str, Any]) -> dict[str, Any]:
    return {"method": "memit", "hparams": FAST, "requests": [req], "batching": "alone"}


def test_edits_survive_kills_a_flush_and_a_postgres_restart(
    model_settings: Callable[..., Settings],
    tiny_dir: Path,
    ledger: Ledger,
    redis_conn: Redis,
    tmp_path: Path,
    measurements: list[str],
) -> None:
    spec = ModelSpec(source=str(tiny_dir), max_batch=1, guard=GuardPolicy(enabled=False))
    settings = model_settings(MODEL, spec, database_url=ledger.url, reconcile_interval_s=1.0,
                              sync_timeout_s=60.0, rate_limit_per_minute=0)  # fmt: skip
    settings = settings.model_copy(update={"models": {MODEL: spec, TWIN: spec}})
    schedule = Schedule(kills=(2, 5, 8), restarts=(10,), flushes=(12,))
    with serve(settings) as url:
        got = run(url, settings, ledger, redis_conn.flushdb, tiny_requests(N), memit_alone,
                  schedule, tmp_path / "logs", model=MODEL, twin=TWIN, timeout_s=180)  # fmt: skip
    assert len(got.accepted) == N
    assert got.statuses == {"applied": N}, got.statuses
    assert got.unfinished_jobs == 0
    assert got.version_numbers == list(range(N + 1))  # contiguous
    assert got.distinct_versions == N  # each edit applied once, in a version of its own
    assert got.after_last_flush_s is not None and got.after_last_flush_s < 60
    assert got.worker_pids_after_flush[0] == got.worker_pids_after_flush[1]  # no restart
    assert got.head_sha256 and got.head_sha256 == got.twin_sha256
    assert got.rollback_exact, got.rollback_to
    measurements.append(
        f"chaos: {N} edits from 3 clients, {got.kills} worker kills, {got.restarts} PostgreSQL "
        f"restart, {got.flushes} Redis flush in {got.seconds:.0f} s; the jobs left at the flush "
        f"finished {got.after_last_flush_s:.1f} s after it; head equals the uninterrupted twin"
    )
