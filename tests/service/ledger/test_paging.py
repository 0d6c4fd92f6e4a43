"""Keyset paging of the ledger's listings (service/ledger/paging.py): cursors and limits,
each test inside a transaction that is rolled back."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from service import ledger
from service.errors import InvalidInput
from tests.service.conftest import MODEL, edit_request


@pytest.mark.parametrize("cursor", ["garbage", "e30", "!!", "eyJrIjoiZWRpdHMiLCJhIjoiMSJ9"])
def test_bad_cursor_is_invalid_input(synced: Session, cursor: str) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.list_versions(synced, MODEL, cursor=cursor)
    assert err.value.field == "cursor"


def test_cursor_of_one_listing_is_refused_by_the_other(synced: Session) -> None:
    for _ in range(3):
        ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    synced.commit()
    cursor = ledger.list_edits(synced, MODEL, limit=1).next_cursor
    assert cursor is not None
    with pytest.raises(InvalidInput):
        ledger.list_versions(synced, MODEL, cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, ledger.MAX_PAGE + 1])
def test_limit_out_of_range(synced: Session, limit: int) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.list_edits(synced, MODEL, limit=limit)
    assert err.value.field == "limit"
