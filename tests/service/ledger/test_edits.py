"""Edit listings of the ledger (service/ledger/edits.py) on the real PostgreSQL, each test
inside a transaction that is rolled back."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from service import ledger
from service.errors import InvalidInput
from service.ledger.tables import (
    EditStatus,
)
from tests.service.conftest import MODEL, OTHER, edit_request


def test_list_edits_keyset_pages_cover_everything_once(synced: Session) -> None:
    ids = []
    for i in range(7):
        job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request(subject=f"S{i}")])
        ids.extend(e.id for e in job.edits)
    ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    synced.commit()
    seen, cursor, pages = [], None, 0
    while True:
        page = ledger.list_edits(synced, MODEL, limit=3, cursor=cursor)
        seen.extend(e.id for e in page.items)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3


def test_list_edits_filters_by_status(synced: Session) -> None:
    job = ledger.create_edit_job(
        synced, MODEL, "rome", None, [edit_request(), edit_request(subject="Big Ben")]
    )
    job.edits[1].status = EditStatus.failed
    job.edits[1].reason = "boom"
    synced.commit()
    failed = ledger.list_edits(synced, MODEL, status="failed")
    assert [e.subject for e in failed.items] == ["Big Ben"]
    assert [e.subject for e in ledger.list_edits(synced, MODEL, status="queued").items] == [
        "The Eiffel Tower"
    ]
    with pytest.raises(InvalidInput) as err:
        ledger.list_edits(synced, MODEL, status="lost")
    assert err.value.field == "status"
