"""What happens to jobs and models, in order: rows of ``events`` that the Server-Sent
Events streams replay (``GET /v1/jobs/{id}/events``, ``GET /v1/models/{model}/events``).

Each event is written in the transaction of the change it reports, so a stream never
shows what did not commit and misses nothing that did: a client that reconnects
with ``Last-Event-ID`` gets every event after that id.

Kinds and their ``data``:

- ``status`` — a job's status changed: ``{"status", "kind", "message"?, "error"?,
  "versions"?}`` (queued when accepted or put back, running, succeeded, failed,
  cancelled; ``"cancel_requested": true`` when an operator asked to stop it);
- ``progress`` — ``{"progress", "message"}`` of a running job;
- ``version`` — a version was committed: ``{"number", "kind", "parent", "job_id"}``;
- ``rejection`` — the guard refused an update: ``{"job_id", "rules", "reason"}``;
- ``evaluation`` — an evaluation's scores: ``{"evaluation_id", "suite", "version",
  "metrics"}``; ``alert`` — its policy's threshold was crossed (the alert's fields).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.ledger.tables import Event, Job, JobStatus

# the statuses after which a job changes no more: its stream ends with one of these
FINAL = frozenset({JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value})
# the most events one read returns (a stream reads again at once when it got this many)
BATCH = 200


def add(
    session: Session,
    model_id: int,
    kind: str,
    data: Mapping[str, Any],
    job_id: str | None = None,
) -> None:
    """Record one event in the caller's transaction."""
    session.add(Event(model_id=model_id, job_id=job_id, kind=kind, data=dict(data)))


def job_status(session: Session, job: Job, **extra: Any) -> None:
    """A ``status`` event with ``job``'s status now and ``extra`` fields."""
    data = {"status": job.status.value, "kind": job.kind.value}
    data.update({k: v for k, v in extra.items() if v is not None})
    add(session, job.model_id, "status", data, job.id)


# what a bulk UPDATE … RETURNING gives the events: RETURNING(*CHANGED)
CHANGED = (Job.id, Job.model_id, Job.kind)


def jobs_status(
    session: Session, changed: Sequence[Sequence[Any]], status: JobStatus, **extra: Any
) -> None:
    """A ``status`` event of ``status`` for each ``(id, model_id, kind)`` row a bulk
    update returned (:data:`CHANGED`)."""
    for job_id, model_id, kind in changed:
        data = {"status": status.value, "kind": kind.value}
        data.update({k: v for k, v in extra.items() if v is not None})
        add(session, model_id, "status", data, job_id)


def after(
    session: Session,
    *,
    job_id: str | None = None,
    model_id: int | None = None,
    after_id: int = 0,
    limit: int = BATCH,
) -> list[Event]:
    """The events of one job, or of one model (all its jobs' and its own), with an id
    above ``after_id``, oldest first."""
    query = select(Event).where(Event.id > after_id)
    if job_id is not None:
        query = query.where(Event.job_id == job_id)
    if model_id is not None:
        query = query.where(Event.model_id == model_id)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))


def is_final(event: Event) -> bool:
    """Whether ``event`` says its job has ended."""
    return event.kind == "status" and event.data.get("status") in FINAL


def last_id(session: Session, *, model_id: int) -> int:
    """The id of the model's latest event (0 when it has none): a stream from now."""
    found = session.scalar(select(func.max(Event.id)).where(Event.model_id == model_id))
    return int(found or 0)


def ended(session: Session, job_id: str) -> Event | None:
    """For a finished job, its final status as an unsaved event (id 0, so that a
    stream ends on it without replaying anything); None while the job runs."""
    job = session.get(Job, job_id)
    if job is None or job.status.value not in FINAL:
        return None
    data = {"status": job.status.value, "kind": job.kind.value}
    return Event(id=0, model_id=job.model_id, job_id=job.id, kind="status", data=data,
                 created_at=job.finished_at or job.created_at)  # fmt: skip
