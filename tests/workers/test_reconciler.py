"""The writer's reconciler (workers/reconciler.py) on the real PostgreSQL and Redis:
ledger jobs that Redis lost are enqueued again, in ledger order, and nothing else is;
under a live ``memedit worker`` a flushed Redis costs no job, needs no restart, and
the jobs still run in ledger order."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job as RqJob
from rq.job import JobStatus as RqStatus
from sqlalchemy import Engine, select, update

from service.ledger import models as ledger_models
from service.ledger.sessions import session_scope
from service.ledger.tables import Job, JobStatus
from service.settings import Settings
from tests import worker_harness as harness
from tests.service.conftest import edit_body
from tests.tiny_models import TINY_OVERRIDES
from workers.reconciler import Reconciler

MODEL = "tiny"


@pytest.fixture
def client(
    single_edit_settings: Settings, app_client: Callable[[Settings], TestClient]
) -> TestClient:
    return app_client(single_edit_settings)


def _reconciler(settings: Settings, engine: Engine, redis: Redis, **kw: object) -> Reconciler:
    with session_scope(engine) as s:
        model_id = ledger_models.get_model(s, MODEL).id
    return Reconciler(settings, MODEL, model_id, engine, redis, **{"grace_s": 0.0, **kw})


def _post(client: TestClient, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(method="memit"))
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
        time.sleep(0.002)  # distinct created_at
    return ids


def _edit_queue(settings: Settings, redis: Redis) -> Queue:
    return Queue(settings.edit_queue(MODEL), connection=redis)


def test_after_a_flush_every_queued_job_is_enqueued_again_in_ledger_order(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    jobs = _post(client, 3)
    redis_conn.flushdb()
    rec = _reconciler(single_edit_settings, clean_db, redis_conn)
    assert rec.run_once() == jobs
    assert _edit_queue(single_edit_settings, redis_conn).get_job_ids() == jobs
    assert rec.run_once() == []  # all waiting now: nothing to do


def test_only_the_lost_jobs_go_back(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    jobs = _post(client, 4)
    q = _edit_queue(single_edit_settings, redis_conn)
    for lost in jobs[:2]:
        q.remove(lost)
        RqJob.fetch(lost, connection=redis_conn).delete()
    assert _reconciler(single_edit_settings, clean_db, redis_conn).run_once() == jobs[:2]
    assert q.get_job_ids() == [*jobs[2:], *jobs[:2]]


def test_stale_entries_are_replaced_and_running_ones_left_alone(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    stale, started = _post(client, 2)
    q = _edit_queue(single_edit_settings, redis_conn)
    for job_id, status in ((stale, RqStatus.FINISHED), (started, RqStatus.STARTED)):
        q.remove(job_id)
        RqJob.fetch(job_id, connection=redis_conn).set_status(status)
    assert _reconciler(single_edit_settings, clean_db, redis_conn).run_once() == [stale]
    assert q.get_job_ids() == [stale]
    assert RqJob.fetch(stale, connection=redis_conn).get_status() is RqStatus.QUEUED


def test_young_running_and_finished_jobs_are_not_touched(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    queued, running, done = _post(client, 3)
    with session_scope(clean_db) as s:
        s.execute(update(Job).where(Job.id == running).values(status=JobStatus.running))
        s.execute(update(Job).where(Job.id == done).values(status=JobStatus.succeeded))
    redis_conn.flushdb()
    # inside the grace period the API is still enqueueing it
    assert _reconciler(single_edit_settings, clean_db, redis_conn, grace_s=60.0).run_once() == []
    assert _reconciler(single_edit_settings, clean_db, redis_conn).run_once() == [queued]


def test_evaluation_jobs_go_back_to_the_evaluation_queue(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    r = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"})
    assert r.status_code == 202, r.text
    redis_conn.flushdb()
    assert _reconciler(single_edit_settings, clean_db, redis_conn).run_once() == [
        r.json()["job_id"]
    ]
    evals = Queue(single_edit_settings.eval_queue(MODEL), connection=redis_conn)
    assert evals.get_job_ids() == [r.json()["job_id"]]
    assert _edit_queue(single_edit_settings, redis_conn).get_job_ids() == []


def test_a_job_accepted_while_redis_was_down_is_queued_by_the_thread(
    single_edit_settings: Settings,
    app_client: Callable[[Settings], TestClient],
    clean_db: Engine,
    redis_conn: Redis,
) -> None:
    down = app_client(
        single_edit_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    )
    r = down.post(f"/v1/models/{MODEL}/edits", json=edit_body(method="memit"))
    assert r.status_code == 202, r.text
    q = _edit_queue(single_edit_settings, redis_conn)
    assert q.get_job_ids() == []
    settings = single_edit_settings.model_copy(update={"reconcile_interval_s": 0.1})
    rec = _reconciler(settings, clean_db, redis_conn)
    rec.start()
    try:
        deadline = time.monotonic() + 10
        while q.get_job_ids() != [r.json()["job_id"]]:
            assert time.monotonic() < deadline, "the reconciler did not queue the job"
            time.sleep(0.05)
    finally:
        rec.stop()


def test_the_thread_outlives_a_redis_that_does_not_answer(
    client: TestClient, single_edit_settings: Settings, clean_db: Engine
) -> None:
    broken = Redis.from_url("redis://127.0.0.1:1/0")
    settings = single_edit_settings.model_copy(update={"reconcile_interval_s": 0.05})
    rec = _reconciler(settings, clean_db, broken)
    _post(client, 1)
    with pytest.raises(RedisError):
        rec.run_once()
    rec.start()
    time.sleep(0.5)  # several failed passes, with backoff
    assert rec._thread is not None and rec._thread.is_alive()
    rec.stop()


@pytest.mark.e2e
def test_a_flush_under_a_live_worker_loses_no_job(
    client: TestClient,
    single_edit_settings: Settings,
    clean_db: Engine,
    redis_conn: Redis,
    tmp_path: Path,
) -> None:
    """``memedit worker`` runs; Redis is flushed while jobs wait: every job finishes
    within 60 s, with the same worker process, in ledger order."""
    fast = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16,
            "v_num_grad_steps": 5}  # fmt: skip
    subjects = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin"]
    jobs = []
    for subject in subjects:
        req = {"prompt": "{} was born in", "subject": subject, "target_new": "Rome"}
        body = {"method": "memit", "hparams": fast, "requests": [req], "batching": "alone"}
        r = client.post(f"/v1/models/{MODEL}/edits", json=body)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job_id"])
    log = tmp_path / "worker.log"
    proc = harness.spawn_worker(single_edit_settings, MODEL, log, MEMEDIT_RECONCILE_INTERVAL_S="1")

    def statuses() -> list[JobStatus]:
        with session_scope(clean_db) as s:
            found = {j.id: j.status for j in s.scalars(select(Job).where(Job.id.in_(jobs)))}
        return [found[j] for j in jobs]

    try:
        deadline = time.monotonic() + 120
        while statuses()[0] is not JobStatus.succeeded:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        redis_conn.flushdb()  # the rest of the queue, and the worker's own keys, gone
        flushed = time.monotonic()
        while not all(s is JobStatus.succeeded for s in statuses()):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - flushed < 60, (statuses(), log.read_text()[-3000:])
            time.sleep(0.2)
        assert proc.poll() is None, "the worker must not need a restart"
    finally:
        harness.stop(proc)
    versions = [client.get(f"/v1/jobs/{j}").json()["result"]["versions"] for j in jobs]
    assert versions == [[n] for n in range(1, len(jobs) + 1)], (versions, log.read_text())
    assert "re-enqueued" in log.read_text()
