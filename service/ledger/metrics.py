"""The ledger's numbers for Prometheus (:mod:`service.metrics` turns them into metric
families at each scrape): aggregates only, one query each, bounded label sets
(models, methods, statuses, kinds, rules, suites, the head's edited layers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Boolean, case, cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from service.ledger.tables import (
    Edit,
    EditStatus,
    Evaluation,
    GuardDecision,
    Job,
    JobStatus,
    Model,
    Version,
)

# the outcomes an edit reaches once and keeps (a counter may only grow): an edit that a
# version applied counts as applied even after a rollback reverted it
OUTCOMES = ("applied", "rejected", "failed", "cancelled")


@dataclass
class LedgerNumbers:
    """What one scrape reads from the ledger."""

    models: list[str] = field(default_factory=list)
    # (model, method, outcome) -> edits that reached it
    edit_outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # (model, status) -> edits in that status now
    edits_now: dict[tuple[str, str], int] = field(default_factory=dict)
    # kind -> ([count per bucket upper bound, cumulative], total count, sum of seconds)
    durations: dict[str, tuple[list[int], int, float]] = field(default_factory=dict)
    head: dict[str, int] = field(default_factory=dict)
    # (model, parameter) -> the head version's drift of that edited parameter
    # (‖W − W₀‖_F / rows, as versions report it)
    drift: dict[tuple[str, str], float] = field(default_factory=dict)
    # (model, rule) -> updates the guard rejected with that rule among its reasons
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)
    # (model, suite, metric) -> (score, version) of the latest finished run of the suite
    scores: dict[tuple[str, str, str], tuple[float, int]] = field(default_factory=dict)


def read(session: Session, buckets: Sequence[float]) -> LedgerNumbers:
    """Every number of :class:`LedgerNumbers`, for the histogram ``buckets`` (seconds)."""
    out = LedgerNumbers()
    names = dict(session.execute(select(Model.id, Model.name)).all())
    out.models = sorted(names.values())
    _edits(session, names, out)
    _durations(session, buckets, out)
    _versions(session, names, out)
    _rejections(session, names, out)
    _scores(session, names, out)
    return out


def _edits(session: Session, names: dict[int, str], out: LedgerNumbers) -> None:
    outcome = case(
        (Edit.version_id.is_not(None), "applied"),
        (Edit.status == EditStatus.rejected, "rejected"),
        (Edit.status == EditStatus.failed, "failed"),
        (Edit.status == EditStatus.cancelled, "cancelled"),
        else_=None,
    ).label("outcome")
    rows = session.execute(
        select(Edit.model_id, Edit.method, outcome, func.count())
        .group_by(Edit.model_id, Edit.method, outcome)
    )  # fmt: skip
    for model_id, method, reached, n in rows:
        if reached is not None:
            out.edit_outcomes[(names[model_id], method, reached)] = n
    for model_id, status, n in session.execute(
        select(Edit.model_id, Edit.status, func.count()).group_by(Edit.model_id, Edit.status)
    ):
        out.edits_now[(names[model_id], status.value)] = n


def _durations(session: Session, buckets: Sequence[float], out: LedgerNumbers) -> None:
    seconds = func.extract("epoch", Job.finished_at - Job.started_at)
    columns: list[Any] = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.count().filter(seconds <= bound) for bound in buckets]
    finished = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
    rows = session.execute(
        select(Job.kind, *columns)
        .where(Job.status.in_(finished), Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .group_by(Job.kind)
    )  # fmt: skip
    for kind, total, total_s, *cumulative in rows:
        out.durations[kind.value] = ([int(c) for c in cumulative], int(total), float(total_s))


def _versions(session: Session, names: dict[int, str], out: LedgerNumbers) -> None:
    heads = (
        select(Version.model_id, func.max(Version.number).label("number"))
        .group_by(Version.model_id)
        .subquery()
    )
    rows = session.execute(
        select(Version.model_id, Version.number, Version.drift).join(
            heads, (Version.model_id == heads.c.model_id) & (Version.number == heads.c.number)
        )
    )
    for model_id, number, drift in rows:
        name = names[model_id]
        out.head[name] = number
        for param, value in (drift or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.drift[(name, param)] = float(value)


def _rejections(session: Session, names: dict[int, str], out: LedgerNumbers) -> None:
    rule = func.jsonb_array_elements_text(cast(GuardDecision.rules, JSONB)).table_valued("value")
    rows = session.execute(
        select(GuardDecision.model_id, rule.c.value, func.count())
        .select_from(GuardDecision)
        .join(rule, cast(True, Boolean))
        .where(GuardDecision.accepted.is_(False))
        .group_by(GuardDecision.model_id, rule.c.value)
    )
    for model_id, name, n in rows:
        out.rejections[(names[model_id], name)] = n
    # a rejection without a named rule (e.g. a failed measurement) still counts
    unnamed = session.execute(
        select(GuardDecision.model_id, func.count())
        .where(
            GuardDecision.accepted.is_(False),
            func.jsonb_array_length(cast(GuardDecision.rules, JSONB)) == 0,
        )
        .group_by(GuardDecision.model_id)
    )
    for model_id, n in unnamed:
        out.rejections[(names[model_id], "other")] = n


def _scores(session: Session, names: dict[int, str], out: LedgerNumbers) -> None:
    latest = (
        select(Evaluation.model_id, Evaluation.suite, func.max(Evaluation.id).label("id"))
        .where(Evaluation.status == JobStatus.succeeded)
        .group_by(Evaluation.model_id, Evaluation.suite)
        .subquery()
    )
    rows = session.execute(
        select(Evaluation.model_id, Evaluation.suite, Evaluation.version, Evaluation.metrics).join(
            latest, Evaluation.id == latest.c.id
        )
    )
    for model_id, suite, version, metrics in rows:
        for metric, value in (metrics or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.scores[(names[model_id], suite, metric)] = (float(value), version)
