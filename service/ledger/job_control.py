"""Jobs for operators: the newest-first listing of a deployment's jobs, and
cancellation (``POST /v1/jobs/{id}/cancel``).

- A **queued** job is cancelled at once: the job, its queued edits and its evaluation
  row become ``cancelled``; its queue entry, when a worker dequeues it, finds nothing
  to run.
- A **running** edit or evaluation job is marked ``cancel_requested``; its worker
  stops it at the next safe point (:func:`cancelled`): between two batches, or
  inside a batch of its own before the version is committed, so that nothing is half
  committed. Versions it committed before stay applied; its edits still queued
  become ``cancelled``. A running rollback, export or import is one step and cannot be stopped (409).
- A finished job cannot be cancelled (409).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload

from service.errors import Conflict, InvalidInput
from service.ledger import events
from service.ledger.jobs import get_job
from service.ledger.models import get_model
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    Edit,
    EditStatus,
    Evaluation,
    Job,
    JobKind,
    JobStatus,
    utcnow,
)

log = logging.getLogger(__name__)

E = TypeVar("E", JobStatus, JobKind)

CANCELLED_BY_OPERATOR = "cancelled by an operator"


def list_jobs(
    session: Session,
    *,
    model_name: str | None = None,
    status: JobStatus | str | None = None,
    kind: JobKind | str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Job]:
    """A page of jobs, newest first, optionally of one model, status and kind."""
    check_limit(limit)
    before = decode_cursor(cursor, "jobs")
    query = select(Job).options(joinedload(Job.model))
    if model_name is not None:
        query = query.where(Job.model_id == get_model(session, model_name).id)
    if status is not None:
        query = query.where(Job.status == _member(JobStatus, status, "status"))
    if kind is not None:
        query = query.where(Job.kind == _member(JobKind, kind, "kind"))
    if before is not None:
        query = query.where(Job.seq < before)
    rows = list(session.scalars(query.order_by(Job.seq.desc()).limit(limit + 1)))
    return page(rows, limit, "jobs", lambda j: j.seq)


def _member(cls: type[E], value: E | str, field: str) -> E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(m.value for m in cls)
        raise InvalidInput(field, f"unknown {field} {value!r}; known: {known}") from None


def cancel_job(session: Session, job_id: str) -> Job:
    """Cancel a queued job, or ask its worker to stop a running one (module doc)."""
    job = get_job(session, job_id)
    job = session.get(Job, job.id, with_for_update=True, populate_existing=True) or job
    if job.status not in (JobStatus.queued, JobStatus.running):
        raise Conflict("job_id", f"job {job.id} is {job.status.value}; only an unfinished job can be cancelled")  # fmt: skip
    if job.status is JobStatus.queued:
        _mark_cancelled(session, [job.id], CANCELLED_BY_OPERATOR)
        log.info("job %s cancelled while queued", job.id)
    elif job.kind in (JobKind.rollback, JobKind.export, JobKind.import_):
        raise Conflict("job_id", f"{job.kind.value} job {job.id} is running: it is one step and cannot be stopped")  # fmt: skip
    elif not job.cancel_requested:
        job.cancel_requested = True
        job.message = "cancel requested: stopping at the next safe point"
        events.job_status(session, job, cancel_requested=True, message=job.message)
        log.info("job %s: cancel requested while running", job.id)
    session.flush()
    session.refresh(job)
    return job


def cancel_requested(session: Session, job_ids: Sequence[str]) -> set[str]:
    """Those of ``job_ids`` whose cancellation an operator asked for."""
    if not job_ids:
        return set()
    return set(
        session.scalars(
            select(Job.id).where(Job.id.in_(list(job_ids)), Job.cancel_requested.is_(True))
        )
    )


def cancelled(session: Session, job_ids: Sequence[str], message: str) -> list[str]:
    """The worker stopped these running jobs at a safe point: they end ``cancelled``
    (their committed versions stay, their queued edits are cancelled). Returns the
    jobs this call cancelled."""
    return _mark_cancelled(session, job_ids, message, running=True)


def _mark_cancelled(
    session: Session, job_ids: Sequence[str], message: str, *, running: bool = False
) -> list[str]:
    status = JobStatus.running if running else JobStatus.queued
    changed = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == status)
        .values(status=JobStatus.cancelled, message=message, finished_at=utcnow())
        .returning(*events.CHANGED)
    ).all()
    if not changed:
        return []
    done = [row[0] for row in changed]
    session.execute(
        update(Edit)
        .where(Edit.job_id.in_(done), Edit.status == EditStatus.queued)
        .values(status=EditStatus.cancelled, reason=message)
    )
    session.execute(
        update(Evaluation)
        .where(Evaluation.job_id.in_(done), Evaluation.status.in_([JobStatus.queued, JobStatus.running]))
        .values(status=JobStatus.cancelled, finished_at=utcnow())
    )  # fmt: skip
    events.jobs_status(session, changed, JobStatus.cancelled, message=message)
    return done
