"""The ``versions`` aggregate: the listing of a model's versions."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.ledger.models import get_model
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    Version,
)

log = logging.getLogger(__name__)


def list_versions(
    session: Session, model_name: str, limit: int = 50, cursor: str | None = None
) -> Page[Version]:
    """A page of the model's versions by ascending number."""
    model = get_model(session, model_name)
    check_limit(limit)
    after = decode_cursor(cursor, "versions")
    query = select(Version).where(Version.model_id == model.id)
    if after is not None:
        query = query.where(Version.number > after)
    rows = list(session.scalars(query.order_by(Version.number).limit(limit + 1)))
    return page(rows, limit, "versions", lambda v: v.number)
