"""Jobs in the ledger (service/ledger/jobs.py) on the real PostgreSQL, each test inside a
transaction that is rolled back."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from service import ledger
from service.errors import InvalidInput, NotFound
from service.ledger import jobs as ledger_jobs
from service.ledger.lease import JobClaim
from service.ledger.tables import (
    Edit,
    EditStatus,
    Job,
    JobKind,
    JobStatus,
)
from tests.service.conftest import MODEL, OTHER, add_versions, edit_request


def _count(session: Session, table: type) -> int:
    return session.scalar(select(func.count()).select_from(table))


def test_create_edit_job_stores_job_and_ordered_edits(synced: Session) -> None:
    requests = [edit_request(), edit_request(subject="Big Ben", target_new="Paris")]
    job = ledger.create_edit_job(synced, MODEL, "memit", {"v_lr": 0.1}, requests, max_requests=3)
    synced.commit()
    stored = synced.get(Job, job.id)
    assert stored is not None
    assert (stored.kind, stored.status, stored.progress) == (JobKind.edit, JobStatus.queued, 0.0)
    assert stored.payload == {"method": "memit", "hparams": {"v_lr": 0.1}, "batching": "auto"}
    edits = synced.scalars(select(Edit).where(Edit.job_id == job.id).order_by(Edit.id)).all()
    assert [e.position for e in edits] == [0, 1]
    assert [e.subject for e in edits] == ["The Eiffel Tower", "Big Ben"]
    assert {e.status for e in edits} == {EditStatus.queued}
    assert {e.method for e in edits} == {"memit"}
    assert edits[0].paraphrase_prompts == ["The Eiffel Tower stands in the city of"]
    assert [e.id for e in job.edits] == [e.id for e in edits]


@pytest.mark.parametrize(
    ("method", "hparams", "requests", "field"),
    [
        ("sgd", None, [edit_request()], "method"),
        ("rome", {"no_such_knob": 1}, [edit_request()], "hparams.no_such_knob"),
        ("rome", {"v_lr": "fast"}, [edit_request()], "hparams.v_lr"),
        ("rome", {"layers": [3, 4]}, [edit_request()], "hparams.layers"),
        ("rome", None, [], "requests"),
        ("rome", None, [edit_request()] * 4, "requests"),
        ("rome", None, [edit_request(), edit_request(prompt="no slot")], "requests.1.prompt"),
        ("rome", None, [edit_request(subject="")], "requests.0.subject"),
    ],
)
def test_create_edit_job_rejects_bad_input_and_stores_nothing(
    synced: Session, method: str, hparams: dict | None, requests: list, field: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.create_edit_job(synced, MODEL, method, hparams, requests, max_requests=3)
    assert err.value.field == field
    synced.rollback()
    assert _count(synced, Job) == 0
    assert _count(synced, Edit) == 0


def test_unknown_batching_mode_is_invalid_and_stores_nothing(synced: Session) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.create_edit_job(synced, MODEL, "memit", None, [edit_request()], batching="later")
    assert err.value.field == "batching"
    synced.rollback()
    assert _count(synced, Job) == 0


def test_rollback_needs_an_existing_version(synced: Session) -> None:
    # before any worker loaded the model, its base version exists: a rollback to it
    # is accepted (and waits in the queue), one to any other version is not
    with pytest.raises(InvalidInput) as err:
        ledger.create_rollback_job(synced, MODEL, 1)
    assert err.value.field == "to_version"
    assert "its versions are 0..0" in err.value.message
    assert ledger.create_rollback_job(synced, MODEL, 0).payload == {"to_version": 0}
    synced.rollback()
    add_versions(synced, MODEL, 3)
    with pytest.raises(InvalidInput) as err:
        ledger.create_rollback_job(synced, MODEL, 3)
    assert err.value.field == "to_version"
    assert "0..2" in err.value.message
    synced.rollback()
    job = ledger.create_rollback_job(synced, MODEL, 1)
    synced.commit()
    assert (job.kind, job.payload) == (JobKind.rollback, {"to_version": 1})
    assert _count(synced, Job) == 1


def test_rollback_checks_the_version_of_the_right_model(synced: Session) -> None:
    add_versions(synced, OTHER, 5)
    add_versions(synced, MODEL, 1)
    with pytest.raises(InvalidInput):
        ledger.create_rollback_job(synced, MODEL, 4)


def test_get_job(synced: Session) -> None:
    job = ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    synced.commit()
    found = ledger.get_job(synced, job.id)
    assert (found.id, found.model.name) == (job.id, OTHER)
    for bad in (str(uuid.uuid4()), "not-a-uuid", "", "1; DROP TABLE jobs"):
        with pytest.raises(NotFound) as err:
            ledger.get_job(synced, bad)
        assert err.value.field == "job_id"


# -- the worker's side ------------------------------------------------------------------


def _model_id(s: Session) -> int:
    return ledger.get_model(s, MODEL).id


def test_an_edit_entry_runs_the_oldest_queued_edit_or_rollback(synced: Session) -> None:
    """Whatever order Redis delivers entries in, jobs start in ledger order."""
    add_versions(synced, MODEL, 2)
    first = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    second = ledger.create_rollback_job(synced, MODEL, 0)
    third = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    synced.commit()
    mid = _model_id(synced)
    started = [ledger_jobs.start_job(synced, third.id, mid) for _ in range(3)]
    assert [j.id for j in started if j is not None] == [first.id, second.id, third.id]
    assert all(j.status is JobStatus.running for j in started if j is not None)
    # the entries that come later find nothing queued: no-ops
    assert ledger_jobs.start_job(synced, first.id, mid) is None


def test_an_evaluation_entry_runs_its_own_job_only(synced: Session) -> None:
    add_versions(synced, MODEL, 1)
    edit = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    evaluation, _ = ledger.create_evaluation_job(synced, MODEL, "retention", None, {})
    synced.commit()
    mid = _model_id(synced)
    assert ledger_jobs.start_job(synced, evaluation.id, mid).id == evaluation.id  # type: ignore[union-attr]
    assert ledger_jobs.start_job(synced, evaluation.id, mid) is None
    assert synced.get(Job, edit.id).status is JobStatus.queued  # type: ignore[union-attr]


def test_a_running_evaluation_that_a_live_worker_claims_is_not_put_back(
    synced: Session, db_engine: Engine
) -> None:
    """A writer taking the lease over (or a worker back from an outage) puts back the
    running jobs, but not an evaluation a live replica runs under its claim."""
    add_versions(synced, MODEL, 1)
    edit = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    claimed, _ = ledger.create_evaluation_job(synced, MODEL, "retention", None, {})
    orphan, _ = ledger.create_evaluation_job(synced, MODEL, "retention", None, {})
    synced.commit()
    mid = _model_id(synced)
    for job_id in (edit.id, claimed.id, orphan.id):
        ledger_jobs.start_job(synced, job_id, mid)
    with JobClaim(db_engine, claimed.id) as mine:
        assert mine
        with JobClaim(db_engine, claimed.id) as second:
            assert not second  # one claim per job
        assert ledger_jobs.running_elsewhere(synced, synced.get(Job, claimed.id))  # type: ignore[arg-type]
        moved = ledger_jobs.put_back_running(synced, mid, "the writer stopped")
    assert sorted(moved) == sorted([edit.id, orphan.id])
    assert synced.get(Job, claimed.id).status is JobStatus.running  # type: ignore[union-attr]
    assert ledger_jobs.job_kind(synced, claimed.id) is JobKind.evaluation
    assert ledger_jobs.job_kind(synced, "not-a-uuid") is None


def test_start_job_refuses_unknown_and_foreign_jobs(synced: Session) -> None:
    job = ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    with pytest.raises(LookupError):
        ledger_jobs.start_job(synced, str(uuid.uuid4()), _model_id(synced))
    with pytest.raises(ValueError, match="another model"):
        ledger_jobs.start_job(synced, job.id, _model_id(synced))


@pytest.mark.parametrize("done", [JobStatus.succeeded, JobStatus.failed])
def test_fail_leaves_a_finished_job_as_it_is(synced: Session, done: JobStatus) -> None:
    """A worker that lost a race must not turn another's success into a failure."""
    job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    job.status, job.error = done, None
    synced.commit()
    assert ledger_jobs.fail(synced, job.id, "RuntimeError: too late") is False
    synced.refresh(job)
    assert (job.status, job.error) == (done, None)
    assert [e.status for e in job.edits] == [EditStatus.queued]


def test_fail_fails_an_unfinished_job_and_its_queued_edits(synced: Session) -> None:
    job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    synced.commit()
    assert ledger_jobs.fail(synced, job.id, "RuntimeError: boom") is True
    synced.refresh(job)
    assert (job.status, job.error) == (JobStatus.failed, "RuntimeError: boom")
    assert [(e.status, e.reason) for e in job.edits] == [(EditStatus.failed, "RuntimeError: boom")]
