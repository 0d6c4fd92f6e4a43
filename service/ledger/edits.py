"""The ``edits`` aggregate: the listing of a model's edits."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.errors import InvalidInput
from service.ledger.models import get_model
from service.ledger.paging import Page, check_limit, decode_cursor, page
from service.ledger.tables import (
    Edit,
    EditStatus,
)

log = logging.getLogger(__name__)


def list_edits(
    session: Session,
    model_name: str,
    status: EditStatus | str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Edit]:
    """A page of the model's edits by ascending id, optionally of one status.

    Each edit's ``version`` relationship is loaded (its number is the version
    that applied it).
    """
    model = get_model(session, model_name)
    check_limit(limit)
    after = decode_cursor(cursor, "edits")
    query = select(Edit).where(Edit.model_id == model.id)
    if status is not None:
        query = query.where(Edit.status == _edit_status(status))
    if after is not None:
        query = query.where(Edit.id > after)
    rows = list(
        session.scalars(
            query.options(selectinload(Edit.version)).order_by(Edit.id).limit(limit + 1)
        )
    )
    return page(rows, limit, "edits", lambda e: e.id)


def _edit_status(status: EditStatus | str) -> EditStatus:
    try:
        return EditStatus(status)
    except ValueError:
        known = ", ".join(s.value for s in EditStatus)
        raise InvalidInput("status", f"unknown status {status!r}; known: {known}") from None
