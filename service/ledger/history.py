"""The history for dashboards: filtered listings of edits and versions, single items
(an edit; a version with its edits and guard decision), and time series over
versions that a chart draws as they are (``x``: version numbers, one list of values
per series, ``None`` where a version has no value)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, selectinload

from service.errors import InvalidInput, NotFound
from service.ledger.models import get_model, model_policies
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    Edit,
    EditStatus,
    Evaluation,
    GuardDecision,
    JobStatus,
    Version,
    VersionKind,
)

SERIES = ("drift", "update_norm", "edit_scores", "evaluations")
# the per-edit scores a version's edits are averaged on (CounterFact's ES, PS, NS)
EDIT_SCORES = ("efficacy", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class EditFilter:
    status: EditStatus | None = None
    subject: str | None = None  # a case-insensitive substring of the subject
    method: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_version: int | None = None
    max_version: int | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        if self.status is not None:
            out.append(Edit.status == self.status)
        if self.subject:
            out.append(Edit.subject.ilike(f"%{_escape_like(self.subject)}%", escape="\\"))
        if self.method:
            out.append(Edit.method == self.method)
        if self.since is not None:
            out.append(Edit.created_at >= self.since)
        if self.until is not None:
            out.append(Edit.created_at < self.until)
        if self.min_version is not None:
            out.append(Edit.version.has(Version.number >= self.min_version))
        if self.max_version is not None:
            out.append(Edit.version.has(Version.number <= self.max_version))
        return out


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _check_range(low: Any, high: Any, field_low: str) -> None:
    if low is not None and high is not None and low > high:
        raise InvalidInput(field_low, f"must not be after the range's end ({high})")


def list_edits(
    session: Session, model_name: str, where: EditFilter, limit: int = 50, cursor: str | None = None
) -> Page[Edit]:
    """A page of the model's edits by ascending id, filtered by ``where``."""
    model = get_model(session, model_name)
    check_limit(limit)
    _check_range(where.since, where.until, "since")
    _check_range(where.min_version, where.max_version, "min_version")
    after = decode_cursor(cursor, "edits")
    query = select(Edit).where(Edit.model_id == model.id, *where.clauses())
    if after is not None:
        query = query.where(Edit.id > after)
    rows = list(
        session.scalars(
            query.options(selectinload(Edit.version)).order_by(Edit.id).limit(limit + 1)
        )
    )
    return page(rows, limit, "edits", lambda e: e.id)


def list_versions(
    session: Session,
    model_name: str,
    *,
    kind: VersionKind | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Version]:
    """A page of the model's versions by ascending number, of one kind, in a time range."""
    model = get_model(session, model_name)
    check_limit(limit)
    _check_range(since, until, "since")
    after = decode_cursor(cursor, "versions")
    query = select(Version).where(Version.model_id == model.id)
    if kind is not None:
        query = query.where(Version.kind == kind)
    if since is not None:
        query = query.where(Version.created_at >= since)
    if until is not None:
        query = query.where(Version.created_at < until)
    if after is not None:
        query = query.where(Version.number > after)
    rows = list(session.scalars(query.order_by(Version.number).limit(limit + 1)))
    return page(rows, limit, "versions", lambda v: v.number)


def get_edit(session: Session, model_name: str, edit_id: int) -> Edit:
    model = get_model(session, model_name)
    edit = session.scalar(
        select(Edit)
        .options(selectinload(Edit.version))
        .where(Edit.model_id == model.id, Edit.id == edit_id)
    )
    if edit is None:
        raise NotFound("edit_id", f"model {model_name!r} has no edit {edit_id}")
    return edit


@dataclass
class VersionDetail:
    version: Version
    edits: list[Edit]
    guard_decision: GuardDecision | None


def get_version(session: Session, model_name: str, number: int) -> VersionDetail:
    """Version ``number`` with the edits it applied and the guard's decision on it."""
    model = get_model(session, model_name)
    version = session.scalar(
        select(Version).where(Version.model_id == model.id, Version.number == number)
    )
    if version is None:
        raise NotFound("number", f"model {model_name!r} has no version {number}")
    edits = list(
        session.scalars(
            select(Edit)
            .options(selectinload(Edit.version))
            .where(Edit.version_id == version.id)
            .order_by(Edit.id)
        )
    )
    decision = session.scalar(
        select(GuardDecision).where(GuardDecision.version_id == version.id).limit(1)
    )
    return VersionDetail(version, edits, decision)


@dataclass
class Series:
    name: str
    x: list[int] = field(default_factory=list)
    series: dict[str, list[float | None]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)


def series(session: Session, model_name: str, name: str, suite: str | None = None) -> Series:
    """The time series ``name`` over the model's versions (module doc): ``drift`` (one
    series per edited parameter), ``update_norm``, ``edit_scores`` (the mean ES, PS
    and NS of each version's edits) or ``evaluations`` of ``suite`` (each metric of
    the latest finished run per version, with the model's policy thresholds)."""
    if name not in SERIES:
        raise InvalidInput("name", f"unknown series {name!r}; known: {', '.join(SERIES)}")
    model = get_model(session, model_name)
    if name == "evaluations":
        if not suite:
            raise InvalidInput("suite", "the evaluations series needs ?suite=")
        return _evaluation_series(session, model, suite)
    versions = list(
        session.execute(
            select(Version.id, Version.number, Version.drift, Version.update_norm)
            .where(Version.model_id == model.id)
            .order_by(Version.number)
        )
    )
    out = Series(name=name, x=[v.number for v in versions])
    if name == "drift":
        params = sorted({p for v in versions for p in (v.drift or {})})
        out.series = {p: [_num((v.drift or {}).get(p)) for v in versions] for p in params}
    elif name == "update_norm":
        out.series = {"update_norm": [_num(v.update_norm) for v in versions]}
    else:
        out.series = _edit_scores(session, [(v.id, v.number) for v in versions], out)
    return out


def _edit_scores(
    session: Session, versions: list[tuple[int, int]], out: Series
) -> dict[str, list[float | None]]:
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ids = [vid for vid, _ in versions]
    for version_id, metrics in session.execute(
        select(Edit.version_id, Edit.metrics).where(Edit.version_id.in_(ids))
    ):
        for key in EDIT_SCORES:
            value = _num((metrics or {}).get(key))
            if value is not None:
                sums[version_id][key].append(value)
    kept = [(vid, n) for vid, n in versions if vid in sums]
    out.x = [n for _, n in kept]
    return {
        key: [(sum(vals) / len(vals)) if (vals := sums[vid][key]) else None for vid, _ in kept]
        for key in EDIT_SCORES
    }


def _evaluation_series(session: Session, model: Any, suite: str) -> Series:
    rows = list(
        session.execute(
            select(Evaluation.version, Evaluation.metrics)
            .where(
                Evaluation.model_id == model.id,
                Evaluation.suite == suite,
                Evaluation.status == JobStatus.succeeded,
            )
            .order_by(Evaluation.version, Evaluation.id)
        )
    )
    latest: dict[int, dict[str, Any]] = {}
    for version, metrics in rows:
        latest[version] = metrics or {}  # the latest run of each version wins
    out = Series(name="evaluations", x=sorted(latest))
    names = sorted({k for m in latest.values() for k, v in m.items() if _num(v) is not None})
    out.series = {k: [_num(latest[n].get(k)) for n in out.x] for k in names}
    for policy in model_policies(model):
        if policy.suite == suite and policy.thresholds:
            out.thresholds = {
                metric: {k: float(v) for k, v in bound.model_dump(exclude_none=True).items()}
                for metric, bound in policy.thresholds.items()
            }
    return out


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
