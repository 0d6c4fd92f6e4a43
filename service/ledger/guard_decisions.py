"""The ``guard_decisions`` aggregate: the guard's judgements of staged updates
(docs/guard.md), listed for the API; for the workers, recording one, and the norm
history of a method's accepted updates that the norm rule compares with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.ledger import events
from service.ledger.models import get_model
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import GuardDecision, Version, VersionKind

log = logging.getLogger(__name__)


def list_guard_decisions(
    session: Session,
    model_name: str,
    *,
    accepted: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[GuardDecision]:
    """A page of the guard's decisions on the model's updates, oldest first, each with
    the version that committed it loaded (None when rejected)."""
    model = get_model(session, model_name)
    check_limit(limit)
    after = decode_cursor(cursor, "guard_decisions")
    query = (
        select(GuardDecision)
        .options(selectinload(GuardDecision.version))
        .where(GuardDecision.model_id == model.id)
    )
    if accepted is not None:
        query = query.where(GuardDecision.accepted.is_(accepted))
    if after is not None:
        query = query.where(GuardDecision.id > after)
    rows = list(session.scalars(query.order_by(GuardDecision.id).limit(limit + 1)))
    return page(rows, limit, "guard_decisions", lambda r: r.id)


# -- the worker's side -------------------------------------------------------------------

# the headline numbers a decision row keeps as columns (all of them are in measurements)
HEADLINE = (
    "update_norm",
    "norm_median",
    "norm_ratio",
    "perplexity_before",
    "perplexity_after",
    "recall_before",
    "recall_after",
)


def record_decision(
    session: Session,
    model_id: int,
    job_id: str,
    *,
    version_id: int | None,
    parent_number: int,
    method: str,
    accepted: bool,
    reason: str | None,
    rules: Sequence[str],
    edit_ids: Sequence[int],
    numbers: Mapping[str, Any],
    measurements: Mapping[str, Any],
    seconds: float | None,
) -> GuardDecision:
    """Add a decision row (in the version's transaction when it was accepted).
    ``numbers``: the verdict's numbers, of which :data:`HEADLINE` become columns;
    ``measurements``: everything, JSON-safe."""

    def num(key: str) -> float | None:
        v = numbers.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    row = GuardDecision(
        model_id=model_id,
        job_id=job_id,
        version_id=version_id,
        parent_number=parent_number,
        method=method,
        accepted=accepted,
        reason=reason,
        rules=list(rules),
        edit_ids=[int(i) for i in edit_ids],
        measurements=dict(measurements),
        seconds=seconds,
        **{key: num(key) for key in HEADLINE},
    )
    session.add(row)
    session.flush()
    if not accepted:
        events.add(session, model_id, "rejection",
                   {"job_id": job_id, "rules": list(rules), "reason": reason,
                    "parent": parent_number, "edit_ids": row.edit_ids}, job_id)  # fmt: skip
    return row


def norm_history(
    session: Session, model_id: int, method: str, window: int
) -> list[tuple[float, int]]:
    """(update norm, requests) of the model's latest ``window`` accepted updates of
    ``method`` (edit versions with a positive norm), oldest first."""
    rows = session.execute(
        select(Version.update_norm, Version.info["batch"]["size"].as_integer())
        .where(
            Version.model_id == model_id,
            Version.kind == VersionKind.edit,
            Version.method == method,
            Version.update_norm > 0,
        )
        .order_by(Version.number.desc())
        .limit(window)
    ).all()
    return [(float(norm), int(size or 1)) for norm, size in reversed(rows)]
