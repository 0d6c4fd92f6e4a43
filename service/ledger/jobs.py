"""The ``jobs`` aggregate: edit and rollback jobs as the API adds them (with their
queued edits) and reads them; for the workers, a job's life (started, progress,
finished, failed, its result growing with each version, put back after a worker
stopped) and the batching claim (:func:`claim_batchable`)."""

from __future__ import annotations

import logging
import typing
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, false, func, not_, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, joinedload

from service.errors import InvalidInput, NotFound
from service.ledger import events
from service.ledger.lease import claimed_elsewhere
from service.ledger.models import get_model, require_version
from service.ledger.tables import (
    Edit,
    EditStatus,
    Evaluation,
    Job,
    JobKind,
    JobStatus,
    utcnow,
)
from service.schemas import Batching, EditRequestIn
from service.validation import check_hparams, check_method

log = logging.getLogger(__name__)

BATCHING_MODES: tuple[str, ...] = typing.get_args(Batching)


def add_job(session: Session, model_id: int, kind: JobKind, payload: dict[str, Any]) -> Job:
    """A queued job of ``kind`` with its input ``payload`` (flushed: it has its id)."""
    job = Job(model_id=model_id, kind=kind, status=JobStatus.queued, progress=0.0, payload=payload)
    session.add(job)
    session.flush()
    events.job_status(session, job)
    return job


def create_edit_job(
    session: Session,
    model_name: str,
    method: str,
    hparams_overrides: Mapping[str, Any] | None,
    requests: Sequence[EditRequestIn | Mapping[str, Any]],
    *,
    max_requests: int | None = None,
    batching: str = "auto",
) -> Job:
    """Add an edit job and one queued edit row per request (positions 0..n-1).

    The job's payload is ``{"method", "hparams", "batching"}`` (the user's
    overrides only; the worker resolves the defaults for the model's
    architecture). ``batching`` is ``"auto"`` (the writer may apply the requests
    together with other queued jobs' requests) or ``"alone"``. Raises
    :class:`NotFound` for an unknown model and :class:`InvalidInput` naming the
    field for an unknown method, a bad override, a bad request, too many, or an
    unknown batching mode.
    """
    model = get_model(session, model_name)
    check_method(method)
    if batching not in BATCHING_MODES:
        raise InvalidInput(
            "batching", f"unknown mode {batching!r}; known: {', '.join(BATCHING_MODES)}"
        )
    overrides = check_hparams(method, hparams_overrides)
    parsed = _parse_requests(requests)
    if not parsed:
        raise InvalidInput("requests", "at least one request is needed")
    if max_requests is not None and len(parsed) > max_requests:
        raise InvalidInput(
            "requests", f"at most {max_requests} requests per edit job (got {len(parsed)})"
        )
    job = add_job(
        session,
        model.id,
        JobKind.edit,
        {"method": method, "hparams": overrides, "batching": batching},
    )
    for position, req in enumerate(parsed):
        session.add(
            Edit(
                model_id=model.id,
                job_id=job.id,
                position=position,
                method=method,
                prompt=req.prompt,
                subject=req.subject,
                target_new=req.target_new,
                target_true=req.target_true,
                paraphrase_prompts=list(req.paraphrase_prompts),
                neighborhood_prompts=list(req.neighborhood_prompts),
                status=EditStatus.queued,
            )
        )
    session.flush()
    session.refresh(job, attribute_names=["edits"])
    log.info("job %s: %d %s edit(s) for %s", job.id, len(parsed), method, model_name)
    return job


def _parse_requests(requests: Sequence[EditRequestIn | Mapping[str, Any]]) -> list[EditRequestIn]:
    parsed = []
    for i, req in enumerate(requests):
        if isinstance(req, EditRequestIn):
            parsed.append(req)
            continue
        try:
            parsed.append(EditRequestIn.model_validate(req))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(["requests", str(i), *(str(p) for p in err["loc"])])
            raise InvalidInput(field, err["msg"]) from None
    return parsed


def create_rollback_job(session: Session, model_name: str, to_version: int) -> Job:
    """Add a rollback job to ``to_version``, which must exist for the model."""
    model = get_model(session, model_name)
    require_version(session, model, to_version, "to_version")
    job = add_job(session, model.id, JobKind.rollback, {"to_version": to_version})
    log.info("job %s: rollback of %s to version %d", job.id, model_name, to_version)
    return job


def get_job(session: Session, job_id: str) -> Job:
    """The job (its ``model`` loaded); :class:`NotFound` (``job_id``) if there is none.

    A string that is not a job id (a UUID) is simply not found.
    """
    try:
        key = str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound("job_id", f"unknown job {job_id!r}") from None
    job = session.scalar(select(Job).options(joinedload(Job.model)).where(Job.id == key))
    if job is None:
        raise NotFound("job_id", f"unknown job {job_id!r}")
    return job


# -- the worker's side -------------------------------------------------------------------


def start_job(session: Session, job_id: str, model_id: int) -> Job | None:
    """The job that the queue entry of ``job_id`` runs, marked ``running`` (row-locked);
    None when there is nothing to run (the entry is then a no-op).

    An evaluation entry runs its own job if it is still queued. Any other entry (edit,
    rollback, export, import) runs the model's *oldest* queued job of those kinds, usually ``job_id``
    itself: the ledger's order holds whatever order Redis delivers the entries in
    (after a flush the reconciler re-enqueues lost jobs behind newer ones), and every
    queued job has an entry, so each job runs once, and a later entry finds nothing.
    Jobs locked by another transaction are skipped. ``LookupError`` for an unknown
    job, ``ValueError`` for another model's."""
    named = session.get(Job, job_id)
    if named is None:
        raise LookupError(f"job {job_id} is not in the ledger")
    if named.model_id != model_id:
        raise ValueError(f"job {job_id} belongs to another model")
    if named.kind is JobKind.evaluation:
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None or job.status is not JobStatus.queued:
            return None
    else:
        job = session.scalar(
            select(Job)
            .where(
                Job.model_id == model_id,
                Job.status == JobStatus.queued,
                Job.kind != JobKind.evaluation,
            )
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
        if job is None:
            return None
        if job.id != job_id:
            log.info("entry of job %s runs the older queued job %s first", job_id, job.id)
    job.status = JobStatus.running
    job.started_at = job.started_at or utcnow()
    events.job_status(session, job)
    return job


def set_progress(
    session: Session, job_ids: Sequence[str], fraction: float, message: str
) -> set[str]:
    """The jobs' progress, which only moves forward while a job runs (a report below
    the last one keeps the last); returns the jobs an operator asked to cancel."""
    fraction, message = max(0.0, min(1.0, fraction)), message[:500]
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)))
        .values(progress=func.greatest(Job.progress, fraction), message=message)
        .returning(Job.id, Job.model_id, Job.progress, Job.cancel_requested)
    ).all()
    for job_id, model_id, now, _ in rows:
        events.add(session, model_id, "progress", {"progress": now, "message": message}, job_id)
    return {job_id for job_id, _, _, cancel in rows if cancel}


def finish(session: Session, job_ids: Sequence[str], result: dict[str, Any] | None) -> None:
    """Mark running jobs succeeded (an edit job's result was written with its versions)."""
    values: dict[str, Any] = {
        "status": JobStatus.succeeded,
        "progress": 1.0,
        "finished_at": utcnow(),
        "message": None,
    }
    if result is not None:
        values["result"] = result
    done = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.running)
        .values(**values)
        .returning(*events.CHANGED)
    ).all()
    events.jobs_status(session, done, JobStatus.succeeded)


UNFINISHED = (JobStatus.queued, JobStatus.running)


def fail(session: Session, job_id: str, reason: str) -> bool:
    """The job failed with ``reason``; its edits that were still queued fail with it.

    Only an unfinished job fails: a job that another worker finished (succeeded, or
    failed for its own reason) keeps its status. Returns whether this call failed it.
    """
    failed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(UNFINISHED))
        .values(status=JobStatus.failed, error=reason, finished_at=utcnow())
        .returning(*events.CHANGED)
    ).all()
    if not failed:
        log.warning("job %s is finished already; not failing it (%s)", job_id, reason)
        return False
    events.jobs_status(session, failed, JobStatus.failed, error=reason)
    session.execute(
        update(Edit)
        .where(Edit.job_id == job_id, Edit.status == EditStatus.queued)
        .values(status=EditStatus.failed, reason=reason)
    )
    return True


def add_version_results(
    session: Session,
    number: int,
    method: str,
    size: int,
    rows_by_job: Mapping[str, Mapping[str, Any]],
) -> None:
    """Each job's result grows in the version's transaction (its version, its edits'
    metrics rows, the batch), so that a worker that dies later leaves each result
    matching the applied edits."""
    for job_id, rows in rows_by_job.items():
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} is not in the ledger")
        old = job.result or {}
        job.result = {
            "versions": [*old.get("versions", []), number],
            "metrics": {**old.get("metrics", {}), **rows},
            "method": method,
            "batches": [
                *old.get("batches", []),
                {"version": number, "size": size, "edit_ids": [int(k) for k in rows]},
            ],
        }


def add_rejection_results(
    session: Session, ids_by_job: Mapping[str, Sequence[int]], rejection: Mapping[str, Any]
) -> None:
    """Add a rejected update (``{"reason", "rules", "guard_decision_id"}``) to each
    job's result, with the job's edit ids of the update."""
    for job_id, ids in ids_by_job.items():
        job = session.get(Job, job_id)
        if job is None:
            continue
        old = job.result or {}
        job.result = {
            **old,
            "versions": old.get("versions", []),
            "rejected": [*old.get("rejected", []), {"edit_ids": sorted(ids), **rejection}],
        }


def edit_payload(session: Session, job_id: str) -> dict[str, Any]:
    """An edit or rollback job's input (``{"method", "hparams", "batching"}`` or
    ``{"to_version"}``)."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} is not in the ledger")
    return dict(job.payload or {})


def unfinished_jobs(session: Session, model_id: int) -> list[Job]:
    """The model's jobs that are queued or running, oldest first (row-locked)."""
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.model_id == model_id,
                Job.status.in_(UNFINISHED),
            )
            .order_by(Job.created_at)
            .with_for_update()
        )
    )


def queued_jobs(
    session: Session, model_id: int, created_before: datetime
) -> list[tuple[str, JobKind]]:
    """The ids and kinds of the model's ``queued`` jobs created before
    ``created_before``, oldest first (the reconciler's view of what should wait in
    the queues)."""
    rows = session.execute(
        select(Job.id, Job.kind)
        .where(
            Job.model_id == model_id,
            Job.status == JobStatus.queued,
            Job.created_at < created_before,
        )
        .order_by(Job.created_at, Job.id)
    )
    return [(str(job_id), kind) for job_id, kind in rows]


def put_back(session: Session, job: Job, message: str) -> None:
    """A job (and its evaluation row) becomes ``queued`` again with ``message``; its
    applied edits stay applied, its queued ones run again."""
    job.status = JobStatus.queued
    job.message = message
    job.progress = 0.0
    events.job_status(session, job, message=message)
    if job.kind is JobKind.evaluation:
        session.execute(
            update(Evaluation).where(Evaluation.job_id == job.id).values(status=JobStatus.queued)
        )


def put_back_running(session: Session, model_id: int, message: str) -> list[str]:
    """Every ``running`` job of the model becomes ``queued`` again (the worker lost
    track of them: a ledger outage), except an evaluation that a live worker still
    claims (:func:`running_elsewhere`); their ids."""
    moved = []
    for job in unfinished_jobs(session, model_id):
        if job.status is JobStatus.running and not running_elsewhere(session, job):
            put_back(session, job, message)
            moved.append(job.id)
    return moved


def running_elsewhere(session: Session, job: Job) -> bool:
    """Whether ``job`` is a running evaluation that a live worker claims: a replica
    runs it (:class:`service.ledger.lease.JobClaim`)."""
    return (
        job.kind is JobKind.evaluation
        and job.status is JobStatus.running
        and claimed_elsewhere(session, job.id)
    )


def job_kind(session: Session, job_id: str) -> JobKind | None:
    """The kind of job ``job_id``, or None when the ledger has no such job."""
    try:
        key = str(uuid.UUID(job_id))
    except ValueError:
        return None
    return session.scalar(select(Job.kind).where(Job.id == key))


# -- batching: the queued jobs a writer takes along (workers/batching.py has the rules) ----


def _compatible(method: str, overrides: Mapping[str, Any]) -> ColumnElement[bool]:
    """Edit jobs the writer may batch with a job of ``method`` and ``overrides``.

    JSONB equality compares the overrides as values (key order does not matter).
    Jobs stored before batching existed have no ``batching`` key: ``auto``.
    """
    payload = type_coerce(Job.payload, JSONB)
    return and_(
        Job.kind == JobKind.edit,
        payload["method"].astext == method,
        payload["hparams"] == type_coerce(dict(overrides), JSONB),
        func.coalesce(payload["batching"].astext, "auto") == "auto",
    )


def claim_batchable(
    session: Session,
    model_id: int,
    method: str,
    overrides: Mapping[str, Any],
    limit: int,
    claimed_by: str,
) -> tuple[list[str], int]:
    """Claim up to ``limit`` queued edit jobs of the model that can be batched with a
    job of ``method``/``overrides``, oldest first, and mark them running.

    Jobs locked by another transaction are skipped (``SKIP LOCKED``); only jobs
    created before the oldest queued job that cannot be batched are taken (the
    writer never reorders jobs: such a job is a barrier; evaluation jobs are none).
    Returns the claimed job ids (oldest first) and how many queued edits they hold.
    The caller commits.
    """
    if limit < 1:
        return [], 0
    compatible = _compatible(method, overrides)
    barrier = (
        select(func.min(Job.created_at))
        .where(
            Job.model_id == model_id,
            Job.status == JobStatus.queued,
            Job.kind != JobKind.evaluation,
            not_(func.coalesce(compatible, false())),
        )
        .scalar_subquery()
    )
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                Job.model_id == model_id,
                Job.status == JobStatus.queued,
                compatible,
                or_(barrier.is_(None), Job.created_at < barrier),
            )
            .order_by(Job.created_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if not ids:
        return [], 0
    session.execute(
        update(Job)
        .where(Job.id.in_(ids))
        .values(
            status=JobStatus.running,
            started_at=func.coalesce(Job.started_at, utcnow()),
            message=f"taken into the batches of job {claimed_by}",
        )
    )
    n_edits = session.scalar(
        select(func.count(Edit.id)).where(Edit.job_id.in_(ids), Edit.status == EditStatus.queued)
    )
    return ids, int(n_edits or 0)
