"""One writer per model (service/ledger/lease.py, workers/roles.py): the lease on the
real PostgreSQL, and two ``memedit worker`` processes for one model: one writes, the
other serves reads and evaluations, and when the writer is killed the replica takes over and
finishes every job, with no duplicate version and no job failed by the race."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine, select, text

from service.ledger import models as ledger_models
from service.ledger.lease import WriterLease
from service.ledger.sessions import session_scope
from service.ledger.tables import Job, JobStatus, Version
from service.settings import Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES

MODEL = "tiny"
FAST = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16,
        "v_num_grad_steps": 5}  # fmt: skip


@pytest.fixture
def client(
    single_edit_settings: Settings, app_client: Callable[[Settings], TestClient]
) -> TestClient:
    return app_client(single_edit_settings)


def _model_id(engine: Engine) -> int:
    with session_scope(engine) as s:
        return ledger_models.get_model(s, MODEL).id


def test_one_lease_per_model(client: TestClient, clean_db: Engine) -> None:
    mid = _model_id(clean_db)
    first, second = WriterLease(clean_db, mid), WriterLease(clean_db, mid)
    other_model = WriterLease(clean_db, mid + 1)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        assert other_model.try_acquire()  # leases are per model
        first.release()
        assert not first.held()
        assert second.try_acquire()
        # the writer's connection is cut (PostgreSQL restarted, a network partition):
        # the lease is gone with it and can be taken again
        with clean_db.connect() as admin:
            admin.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_locks "
                     "WHERE locktype = 'advisory' AND objid = :mid AND pid <> pg_backend_pid()"),
                {"mid": mid},
            )  # fmt: skip
            admin.commit()
        assert not second.held()
        assert first.try_acquire()
    finally:
        for lease in (first, second, other_model):
            lease.release()


def _post(client: TestClient, subject: str) -> str:
    req = {"prompt": "{} was born in", "subject": subject, "target_new": "Rome"}
    body = {"method": "memit", "hparams": FAST, "requests": [req], "batching": "alone"}
    r = client.post(f"/v1/models/{MODEL}/edits", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, *logs: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in logs)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


@pytest.mark.e2e
def test_two_workers_one_writes_the_replica_takes_over(
    client: TestClient,
    single_edit_settings: Settings,
    clean_db: Engine,
    redis_conn: Redis,
    tmp_path: Path,
) -> None:
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = harness.spawn_worker(single_edit_settings, MODEL, logs[0])
    b = None
    try:
        _wait(lambda: "(writer)" in logs[0].read_text(), 120, "the first worker to write", *logs)
        b = harness.spawn_worker(single_edit_settings, MODEL, logs[1])
        _wait(lambda: "(replica)" in logs[1].read_text(), 120, "the second to be a replica", *logs)
        # the replica answers reads while the writer works
        gen = client.post(f"/v1/models/{MODEL}/generate", json={"prompt": "Mozart was born in"})
        assert gen.status_code == 200, gen.text
        jobs = [_post(client, s) for s in ("Mozart", "Picasso", "Einstein", "Curie", "Newton")]
        # while the writer edits, the replica runs an evaluation (at its version)
        ev = client.post(
            f"/v1/models/{MODEL}/evaluations",
            json={"suite": "fluency", "params": {"max_new_tokens": 4, "prompts": ["Mozart"]}},
        )
        assert ev.status_code == 202, ev.text

        def succeeded() -> list[bool]:
            with session_scope(clean_db) as s:
                found = {j.id: j.status for j in s.scalars(select(Job).where(Job.id.in_(jobs)))}
            return [found[j] is JobStatus.succeeded for j in jobs]

        _wait(lambda: succeeded()[0], 120, "the first edit", *logs)
        _wait(lambda: harness.job(client, ev.json()["job_id"])["status"] == "succeeded", 120,
              "the evaluation", *logs)  # fmt: skip
        assert "evaluation 1 (fluency)" in logs[1].read_text()  # the replica ran it
        assert "evaluation 1 (fluency)" not in logs[0].read_text()
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        killed = time.monotonic()
        _wait(lambda: "this worker is the writer" in logs[1].read_text(), 30,
              "the replica to take the lease", *logs)  # fmt: skip
        took_over_s = time.monotonic() - killed
        _wait(lambda: all(succeeded()), 60, "every job after the take-over", *logs)
        assert b.poll() is None
    finally:
        harness.stop(a)
        if b is not None:
            harness.stop(b)
    with session_scope(clean_db) as s:
        numbers = list(s.scalars(select(Version.number).order_by(Version.number)))
        statuses = {j.status for j in s.scalars(select(Job))}
    assert numbers == list(range(len(jobs) + 1)), numbers  # contiguous, none twice
    assert statuses == {JobStatus.succeeded}
    assert "ledger moved" not in logs[0].read_text() + logs[1].read_text()
    assert took_over_s < 30
