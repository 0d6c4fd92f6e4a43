"""The ``evaluations`` aggregate: evaluation jobs asked for over the API or due by
a model's policy, and their listings."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.evaluations import EvaluationPolicy, check_suite_params
from service.ledger.models import get_model, head_version_number, model_policies
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    Evaluation,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
)

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
    job = Job(
        model_id=model_id,
        kind=JobKind.evaluation,
        status=JobStatus.queued,
        progress=0.0,
        payload={"suite": suite, "version": version.number},
    )
    session.add(job)
    session.flush()
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
