"""The ``evaluations`` aggregate: evaluation jobs asked for over the API or due by
a model's policy, and their listings; for the workers, a run's start, result (with
its policy's verdict and, on a breach, the rollback to the last healthy version)
and failure, and the edits a retention run scores."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.jsonsafe import json_safe
from service.ledger import events
from service.ledger.edits import chain_active_edits
from service.ledger.jobs import add_job, create_rollback_job
from service.ledger.models import get_model, head_version_number, model_policies
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.records import chain
from service.ledger.tables import (
    Evaluation,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
    utcnow,
)
from service.ledger.versions import version_records
from service.suites import EvaluationPolicy, breaches, check_suite_params

log = logging.getLogger(__name__)


def create_evaluation_job(
    session: Session,
    model_name: str,
    suite: str,
    version: int | None,
    params: Mapping[str, Any] | None,
) -> tuple[Job, Evaluation]:
    """Add an evaluation job and its queued evaluation row.

    ``version`` None means the head version now (the number is fixed here, so the
    evaluation measures that version even if edits land before it runs). Raises
    :class:`InvalidInput` naming the field for an unknown suite or bad params, and
    :class:`NotFound` (``version``) for a version the model does not have.
    """
    model = get_model(session, model_name)
    checked = check_suite_params(suite, params)
    row = _version_row(session, model, version)
    job, evaluation = _add_evaluation(session, model.id, row, suite, checked)
    log.info(
        "job %s: %s evaluation %d of %s version %d",
        job.id, suite, evaluation.id, model_name, row.number,
    )  # fmt: skip
    return job, evaluation


def _version_row(session: Session, model: Model, version: int | None) -> Version:
    number = head_version_number(session, model.id) if version is None else version
    row = (
        None
        if number is None
        else session.scalar(
            select(Version).where(Version.model_id == model.id, Version.number == number)
        )
    )
    if row is None:
        head = head_version_number(session, model.id)
        have = (
            "it has no versions yet (no worker has registered it)"
            if head is None
            else f"its versions are 0..{head}"
        )
        raise NotFound(
            "version", f"version {number} does not exist for model {model.name!r} ({have})"
        )
    return row


def _add_evaluation(
    session: Session,
    model_id: int,
    version: Version,
    suite: str,
    params: dict[str, Any],
    policy: EvaluationPolicy | None = None,
) -> tuple[Job, Evaluation]:
    job = add_job(
        session, model_id, JobKind.evaluation, {"suite": suite, "version": version.number}
    )
    evaluation = Evaluation(
        model_id=model_id,
        job_id=job.id,
        version=version.number,
        version_id=version.id,
        suite=suite,
        params=params,
        status=JobStatus.queued,
        policy=policy.key if policy is not None else None,
        policy_spec=policy.model_dump(mode="json") if policy is not None else None,
        timing={},
    )
    session.add(evaluation)
    session.flush()
    job.payload = {**job.payload, "evaluation_id": evaluation.id}
    session.flush()
    return job, evaluation


def schedule_policy_evaluations(session: Session, model_id: int, number: int) -> list[str]:
    """Add the evaluation jobs the model's policies ask for after version ``number``.

    A policy with ``every_versions`` N is due when ``number`` is a positive
    multiple of N. Idempotent: a policy that already has an evaluation of this
    version gets no second one (and the table's unique constraint on model,
    version and policy backs that up). Call it in the transaction that commits the
    version, so that the evaluation exists exactly when the version does; enqueue
    the returned job ids after the commit.
    """
    model = session.get(Model, model_id)
    if model is None or number <= 0:
        return []
    due = [p for p in model_policies(model) if number % p.every_versions == 0]
    if not due:
        return []
    version = session.scalar(
        select(Version).where(Version.model_id == model_id, Version.number == number)
    )
    if version is None:
        raise LookupError(f"version {number} of model {model.name!r} is not in the ledger")
    taken = set(
        session.scalars(
            select(Evaluation.policy).where(
                Evaluation.model_id == model_id,
                Evaluation.version == number,
                Evaluation.policy.in_([p.key for p in due]),
            )
        )
    )
    jobs = []
    for p in due:
        if p.key in taken:
            continue
        job, evaluation = _add_evaluation(session, model_id, version, p.suite, p.params, p)
        jobs.append(job.id)
        log.info(
            "policy %s: %s evaluation %d of %s version %d (job %s)",
            p.key, p.suite, evaluation.id, model.name, number, job.id,
        )  # fmt: skip
    return jobs


def get_evaluation(session: Session, model_name: str, evaluation_id: int) -> Evaluation:
    model = get_model(session, model_name)
    row = session.scalar(
        select(Evaluation).where(Evaluation.model_id == model.id, Evaluation.id == evaluation_id)
    )
    if row is None:
        raise NotFound("evaluation_id", f"unknown evaluation {evaluation_id} of {model_name!r}")
    return row


def evaluation_of_job(session: Session, job_id: str) -> Evaluation:
    """The evaluation row of evaluation job ``job_id``."""
    row = session.scalar(select(Evaluation).where(Evaluation.job_id == job_id))
    if row is None:
        raise LookupError(f"job {job_id} has no evaluation row")
    return row


def list_evaluations(
    session: Session,
    model_name: str,
    suite: str | None = None,
    *,
    version: int | None = None,
    alerts_only: bool = False,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Evaluation]:
    """A page of the model's evaluations as a time series: by ascending version
    number, then in the order they were asked for (id). ``alerts_only``: only
    evaluations that raised an alert (the ``alerts`` listing, its own cursors)."""
    model = get_model(session, model_name)
    check_limit(limit)
    kind = "alerts" if alerts_only else "evaluations"
    after = decode_cursor(cursor, kind)
    query = select(Evaluation).where(Evaluation.model_id == model.id)
    if suite is not None:
        query = query.where(Evaluation.suite == suite)
    if version is not None:
        query = query.where(Evaluation.version == version)
    if alerts_only:
        query = query.where(Evaluation.alert.is_not(None))
    if after is not None:
        query = query.where(tuple_(Evaluation.version, Evaluation.id) > tuple_(*after))
    rows = list(session.scalars(query.order_by(Evaluation.version, Evaluation.id).limit(limit + 1)))
    return page(rows, limit, kind, lambda e: [e.version, e.id])


# -- the worker's side -------------------------------------------------------------------


def start_evaluation(session: Session, job_id: str) -> Evaluation:
    """The evaluation row of job ``job_id``, marked running."""
    ev = session.scalar(select(Evaluation).where(Evaluation.job_id == job_id))
    if ev is None:
        raise LookupError(f"job {job_id} has no evaluation row")
    ev.status = JobStatus.running
    ev.started_at = ev.started_at or utcnow()
    return ev


def fail_evaluation(session: Session, job_id: str, reason: str) -> None:
    session.execute(
        update(Evaluation)
        .where(Evaluation.job_id == job_id)
        .values(status=JobStatus.failed, error=reason, finished_at=utcnow())
    )


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def store_result(
    session: Session,
    job_id: str,
    evaluation_id: int,
    metrics: Mapping[str, float],
    details: Mapping[str, Any],
    timing: Mapping[str, float],
) -> tuple[dict[str, Any], str | None]:
    """Write an evaluation's result, its policy's verdict and, for a breach of a
    policy with ``action: rollback``, the rollback job (:func:`rollback_plan`), and
    finish the job. Returns the job's result and the rollback job's id (to enqueue
    after the commit). Non-finite metrics are stored as null (JSONB has none) and
    named in ``details.non_finite_metrics``; thresholds see them as they are."""
    stored = {k: _finite_or_none(v) for k, v in metrics.items()}
    non_finite = {k: str(v) for k, v in metrics.items() if not math.isfinite(v)}
    details = {**details, "non_finite_metrics": non_finite} if non_finite else dict(details)
    rollback_job: str | None = None
    ev = session.get(Evaluation, evaluation_id)
    if ev is None:
        raise LookupError(f"evaluation {evaluation_id} is not in the ledger")
    spec = ev.policy_spec or {}
    passed: bool | None = None
    alert: dict[str, Any] | None = None
    thresholds = spec.get("thresholds") or {}
    if thresholds:
        bad, missing = breaches(dict(metrics), thresholds)
        passed = not bad and not missing
        if not passed:
            alert = {
                "policy": ev.policy,
                "breaches": json_safe(bad),
                "missing": missing,
                "action": spec.get("action", "alert"),
                "raised_at": utcnow().isoformat(),
            }
            if bad and spec.get("action") == "rollback":
                rollback_job, outcome = _queue_rollback(session, ev)
                alert.update(outcome)
    values: dict[str, Any] = {
        "status": JobStatus.succeeded,
        "metrics": stored,
        "details": details,
        "timing": dict(timing),
        "finished_at": utcnow(),
        "passed": passed,
    }
    if alert is not None:
        values["alert"] = alert
    session.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(**values))
    result = {
        "evaluation_id": evaluation_id,
        "suite": ev.suite,
        "version": ev.version,
        "metrics": stored,
        "passed": passed,
        "alert": alert,
    }
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=JobStatus.succeeded,
            progress=1.0,
            message=None,
            result=result,
            finished_at=utcnow(),
        )
    )
    events.add(session, ev.model_id, "evaluation",
               {k: v for k, v in result.items() if k != "alert"}, job_id)  # fmt: skip
    events.jobs_status(session, [(job_id, ev.model_id, JobKind.evaluation)], JobStatus.succeeded)
    if alert is not None:
        events.add(session, ev.model_id, "alert",
                   {"evaluation_id": evaluation_id, "suite": ev.suite, **alert}, job_id)  # fmt: skip
        log.warning("evaluation %d raised an alert: %s", evaluation_id, alert)
    return result, rollback_job


def rollback_plan(session: Session, ev: Evaluation) -> tuple[int | None, str]:
    """Where a rollback after ``ev``'s breach goes, or ``None`` and why not.

    The rule (docs/api.md, "Evaluation policies"):

    - only while the evaluated version is still in effect, i.e. on the head's chain:
      if someone already rolled back past it, its state no longer serves; versions
      committed on top of it since are rolled back too (they were applied to a model
      that breached its thresholds);
    - not while another rollback job of the model is queued or running;
    - to the last healthy version: the latest version before the evaluated one, on
      its chain, whose run of the same policy passed; else the base version 0.
    """
    records = version_records(session, ev.model_id)
    head = max(records)
    if ev.version not in chain(records, head):
        return None, (
            f"version {ev.version} is no longer in effect (head {head} does not build on it)"
        )
    pending = session.scalar(
        select(Job.id).where(
            Job.model_id == ev.model_id,
            Job.kind == JobKind.rollback,
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    if pending is not None:
        return None, f"rollback job {pending} is already pending"
    earlier = sorted(n for n in chain(records, ev.version) if n < ev.version)
    healthy = session.scalars(
        select(Evaluation.version).where(
            Evaluation.model_id == ev.model_id,
            Evaluation.policy == ev.policy,
            Evaluation.status == JobStatus.succeeded,
            Evaluation.passed.is_(True),
            Evaluation.version.in_(earlier),
        )
    ).all()
    target = max(healthy, default=0)
    if target == ev.version:
        return None, "the evaluated version is the base version"
    return target, "last healthy version" if healthy else "no earlier run passed: the base"


def _queue_rollback(session: Session, ev: Evaluation) -> tuple[str | None, dict[str, Any]]:
    target, why = rollback_plan(session, ev)
    if target is None:
        log.warning("evaluation %d: no rollback (%s)", ev.id, why)
        return None, {"rollback": None, "rollback_skipped": why}
    model = session.get(Model, ev.model_id)
    if model is None:
        raise LookupError(f"model {ev.model_id} is not in the ledger")
    job = create_rollback_job(session, model.name, target)
    job.payload = {
        **job.payload,
        "trigger": {"evaluation_id": ev.id, "policy": ev.policy, "version": ev.version},
    }
    session.flush()
    log.warning(
        "evaluation %d of version %d breached policy %s: rollback job %s to version %d (%s)",
        ev.id, ev.version, ev.policy, job.id, target, why,
    )  # fmt: skip
    return job.id, {"rollback": {"job_id": job.id, "to_version": target, "reason": why}}


def chain_edit_cases(session: Session, model_id: int, number: int) -> list[dict[str, Any]]:
    """The edits applied on version ``number``'s chain, in the order they were applied
    (version, then acceptance order), as the retention suite reads them: an edit
    superseded by a later one of the chain is left out (each fact counts once).

    The chain, not the edits' current status, decides: evaluating a version that a
    later rollback left behind still sees the edits it held. An edit whose client gave
    no target_true carries the one its edit job inferred.
    """
    numbers = chain(version_records(session, model_id), number)
    return [
        {
            "edit_id": e.id,
            "prompt": e.prompt,
            "subject": e.subject,
            "target_new": e.target_new,
            "target_true": e.target_true or (e.metrics or {}).get("target_true_inferred"),
            "version": n,
        }
        for e, n in chain_active_edits(session, model_id, numbers)
    ]
