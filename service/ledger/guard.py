"""The ``guard_decisions`` aggregate: the guard's judgements of staged updates."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.ledger.models import get_model
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    GuardDecision,
)

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
