"""Jobs for operators (service/ledger/job_control.py) and the events the ledger writes
with every change (service/ledger/events.py), on the real PostgreSQL inside a
rolled-back transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import ledger
from service.errors import Conflict, InvalidInput
from service.ledger import events, job_control
from service.ledger import jobs as ledger_jobs
from service.ledger.tables import Edit, EditStatus, Event, Job, JobKind, JobStatus
from tests.service.conftest import MODEL, OTHER, add_versions, edit_request


def _mid(s: Session, name: str = MODEL) -> int:
    return ledger.get_model(s, name).id


def _kinds(s: Session, job_id: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.data.get("status")) for e in events.after(s, job_id=job_id)]


def test_jobs_are_listed_newest_first_with_filters_and_pages(synced: Session) -> None:
    add_versions(synced, MODEL, 2)
    made = [ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()]).id
            for _ in range(3)]  # fmt: skip
    rollback = ledger.create_rollback_job(synced, MODEL, 1).id
    other = ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()]).id
    synced.commit()
    everything = job_control.list_jobs(synced, limit=10)
    assert [j.id for j in everything.items] == [other, rollback, *reversed(made)]
    mine = job_control.list_jobs(synced, model_name=MODEL, limit=2)
    assert [j.id for j in mine.items] == [rollback, made[2]]
    rest = job_control.list_jobs(synced, model_name=MODEL, limit=2, cursor=mine.next_cursor)
    assert [j.id for j in rest.items] == [made[1], made[0]] and rest.next_cursor is None
    assert [j.id for j in job_control.list_jobs(synced, kind=JobKind.rollback).items] == [rollback]
    assert job_control.list_jobs(synced, status="running").items == []
    with pytest.raises(InvalidInput) as bad:
        job_control.list_jobs(synced, status="sleeping")
    assert bad.value.field == "status"
    with pytest.raises(InvalidInput):
        job_control.list_jobs(synced, cursor="bm90IGEgY3Vyc29y")  # not a cursor


def test_a_queued_job_is_cancelled_with_its_edits(synced: Session) -> None:
    job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request(), edit_request(
        subject="The Louvre")])  # fmt: skip
    synced.commit()
    job_control.cancel_job(synced, job.id)
    synced.commit()
    row = synced.get(Job, job.id)
    assert row is not None and row.status is JobStatus.cancelled and row.finished_at is not None
    statuses = {e.status for e in synced.scalars(select(Edit).where(Edit.job_id == job.id))}
    assert statuses == {EditStatus.cancelled}
    assert _kinds(synced, job.id) == [("status", "queued"), ("status", "cancelled")]
    # its queue entry then finds nothing to run
    assert ledger_jobs.start_job(synced, job.id, _mid(synced)) is None
    with pytest.raises(Conflict):
        job_control.cancel_job(synced, job.id)


def test_a_running_job_is_asked_to_stop_and_a_finished_one_refuses(synced: Session) -> None:
    add_versions(synced, MODEL, 2)
    edit = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    synced.commit()
    mid = _mid(synced)
    assert ledger_jobs.start_job(synced, edit.id, mid) is not None
    job_control.cancel_job(synced, edit.id)
    row = synced.get(Job, edit.id)
    assert row is not None and row.status is JobStatus.running and row.cancel_requested
    assert ledger_jobs.set_progress(synced, [edit.id], 0.5, "computing") == {edit.id}
    assert job_control.cancelled(synced, [edit.id], "stopped") == [edit.id]
    synced.refresh(row)
    assert row.status is JobStatus.cancelled
    assert _kinds(synced, edit.id) == [
        ("status", "queued"), ("status", "running"), ("status", "running"),  # cancel asked
        ("progress", None), ("status", "cancelled"),
    ]  # fmt: skip

    rollback = ledger.create_rollback_job(synced, MODEL, 0)
    synced.commit()
    assert ledger_jobs.start_job(synced, rollback.id, mid) is not None
    with pytest.raises(Conflict):  # a running rollback is one commit
        job_control.cancel_job(synced, rollback.id)
    ledger_jobs.finish(synced, [rollback.id], {"versions": [2]})
    with pytest.raises(Conflict) as finished:
        job_control.cancel_job(synced, rollback.id)
    assert "succeeded" in str(finished.value)


def test_events_are_ordered_per_job_and_per_model(synced: Session) -> None:
    first = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    second = ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    synced.commit()
    mid = _mid(synced)
    ledger_jobs.start_job(synced, first.id, mid)
    ledger_jobs.fail(synced, first.id, "RuntimeError: boom")
    rows = events.after(synced, model_id=mid)
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert {r.job_id for r in rows} == {first.id}
    assert rows[-1].data == {"status": "failed", "kind": "edit", "error": "RuntimeError: boom"}
    assert events.is_final(rows[-1])
    assert events.last_id(synced, model_id=mid) == rows[-1].id
    (queued,) = events.after(synced, job_id=second.id)  # the other model's job
    assert queued.data["status"] == "queued" and queued.model_id == _mid(synced, OTHER)
    assert synced.scalar(select(Event.id).where(Event.job_id == second.id)) == queued.id
