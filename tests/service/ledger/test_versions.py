"""Version listings of the ledger (service/ledger/versions.py) on the real PostgreSQL, each
test inside a transaction that is rolled back."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service import ledger
from tests.service.conftest import MODEL, add_versions


def test_list_versions_pages_ascending(synced: Session) -> None:
    add_versions(synced, MODEL, 5)
    first = ledger.list_versions(synced, MODEL, limit=2)
    assert [v.number for v in first.items] == [0, 1]
    second = ledger.list_versions(synced, MODEL, limit=2, cursor=first.next_cursor)
    third = ledger.list_versions(synced, MODEL, limit=2, cursor=second.next_cursor)
    assert [v.number for v in second.items + third.items] == [2, 3, 4]
    assert third.next_cursor is None
