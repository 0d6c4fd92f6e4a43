"""Which queued jobs a writer claims for one batch (``claim_batchable`` of
service/ledger/jobs.py), on the real PostgreSQL. Each test runs in a transaction that
is rolled back, except the two-writer test: its writers need connections of their own,
so it commits into the emptied ledger."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service import ledger
from service.ledger.edits import pending_edits
from service.ledger.jobs import claim_batchable as claim_jobs
from service.ledger.tables import Job, JobStatus
from service.settings import ModelSpec, Settings

MODEL = "m"


def _synced(factory: sessionmaker[Session], settings: Settings) -> sessionmaker[Session]:
    with factory.begin() as s:
        ledger.sync_models(
            s, settings.model_copy(update={"models": {MODEL: ModelSpec(source="x")}})
        )
    return factory


@pytest.fixture
def sessions(settings: Settings, session: Session) -> sessionmaker[Session]:
    """Sessions on the test's one connection, in the transaction rolled back after it
    (each ``begin()`` a SAVEPOINT)."""
    factory = sessionmaker(
        bind=session.connection(), join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    return _synced(factory, settings)


@pytest.fixture
def committing_sessions(settings: Settings, clean_db: Engine) -> sessionmaker[Session]:
    """Sessions of their own connections, committing into the emptied ledger."""
    return _synced(sessionmaker(bind=clean_db, expire_on_commit=False), settings)


def add_job(
    sessions: sessionmaker[Session],
    method: str = "memit",
    hparams: dict[str, Any] | None = None,
    n: int = 1,
    batching: str = "auto",
) -> str:
    reqs = [
        {"prompt": "{} was born in", "subject": f"S{i}", "target_new": "Rome"} for i in range(n)
    ]
    with sessions.begin() as s:
        return ledger.create_edit_job(s, MODEL, method, hparams, reqs, batching=batching).id


def add_rollback(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as s:
        model = ledger.get_model(s, MODEL)
        job = Job(model_id=model.id, kind="rollback", status=JobStatus.queued, payload={})
        s.add(job)
        s.flush()
        return job.id


def claim(
    sessions: sessionmaker[Session],
    limit: int = 16,
    method: str = "memit",
    hparams: dict[str, Any] | None = None,
) -> tuple[list[str], int]:
    with sessions.begin() as s:
        model_id = ledger.get_model(s, MODEL).id
        return claim_jobs(s, model_id, method, hparams or {}, limit, "trigger")


def statuses(sessions: sessionmaker[Session], ids: list[str]) -> list[str]:
    with sessions() as s:
        rows = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    return [rows[i].value for i in ids]


def test_claims_compatible_jobs_oldest_first_up_to_the_limit(
    sessions: sessionmaker[Session],
) -> None:
    hp = {"v_lr": 0.1, "layers": [0, 1]}
    ids = [add_job(sessions, hparams=hp, n=n) for n in (1, 2, 1, 1)]
    # the same overrides written in another key order are the same overrides
    got, edits = claim(sessions, limit=2, hparams={"layers": [0, 1], "v_lr": 0.1})
    assert got == ids[:2] and edits == 3
    assert statuses(sessions, ids) == ["running", "running", "queued", "queued"]
    with sessions() as s:
        job = s.get(Job, ids[0])
        assert job is not None and job.started_at is not None and "trigger" in job.message
        assert [e.subject for e in pending_edits(s, ids[:2])] == ["S0", "S0", "S1"]
    assert claim(sessions, limit=5, hparams=hp) == (ids[2:], 2)
    assert claim(sessions, hparams=hp) == ([], 0)


def test_never_claims_other_methods_hparams_or_alone_jobs(
    sessions: sessionmaker[Session],
) -> None:
    # every incompatible job is newer than the compatible one, so no barrier applies
    first = add_job(sessions, hparams={"v_lr": 0.1})
    others = [
        add_job(sessions, hparams={"v_lr": 0.2}),
        add_job(sessions, hparams=None),
        add_job(sessions, method="rome", hparams={"v_lr": 0.1}),
        add_job(sessions, hparams={"v_lr": 0.1}, batching="alone"),
        add_rollback(sessions),
    ]
    assert claim(sessions, hparams={"v_lr": 0.1}) == ([first], 1)
    assert statuses(sessions, others) == ["queued"] * len(others)


@pytest.mark.parametrize("barrier", ["rollback", "alone", "other hparams", "other method"])
def test_never_claims_past_a_queued_job_it_cannot_take(
    sessions: sessionmaker[Session], barrier: str
) -> None:
    before = add_job(sessions)
    if barrier == "rollback":
        stop = add_rollback(sessions)
    elif barrier == "alone":
        stop = add_job(sessions, batching="alone")
    elif barrier == "other hparams":
        stop = add_job(sessions, hparams={"v_lr": 0.2})
    else:
        stop = add_job(sessions, method="rome")
    after = add_job(sessions)
    # applying `after` now would put it before `stop`, which was queued earlier
    assert claim(sessions) == ([before], 1)
    assert statuses(sessions, [stop, after]) == ["queued", "queued"]
    # once the barrier is no longer queued (it ran), the later job can be claimed
    with sessions.begin() as s:
        job = s.get(Job, stop)
        assert job is not None
        job.status = JobStatus.succeeded
    assert claim(sessions) == ([after], 1)


def test_skip_locked_two_writers_never_claim_the_same_job(
    committing_sessions: sessionmaker[Session],
) -> None:
    sessions = committing_sessions
    ids = [add_job(sessions) for _ in range(4)]
    with sessions.begin() as s1:
        model_id = ledger.get_model(s1, MODEL).id
        got1, _ = claim_jobs(s1, model_id, "memit", {}, 2, "w1")
        # a second writer, while the first transaction still holds its row locks
        got2, _ = claim(sessions, limit=4)
    assert got1 == ids[:2] and got2 == ids[2:]


def test_a_queued_evaluation_is_no_barrier(sessions: sessionmaker[Session]) -> None:
    """An evaluation names the version it measures: edits may be applied before it."""
    before = add_job(sessions)
    with sessions.begin() as s:
        model = ledger.get_model(s, MODEL)
        evaluation = Job(model_id=model.id, kind="evaluation", status=JobStatus.queued, payload={})
        s.add(evaluation)
        s.flush()
        evaluation_id = evaluation.id
    after = add_job(sessions)
    assert claim(sessions) == ([before, after], 2)
    assert statuses(sessions, [evaluation_id]) == ["queued"]
