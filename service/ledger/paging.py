"""Keyset pagination of the ledger's listings: items in ascending key order, and
an opaque ``next_cursor`` that resumes after the last item returned (stable while
rows are appended). A cursor from one listing is refused by another."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.errors import InvalidInput

log = logging.getLogger(__name__)

MAX_PAGE = 500


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}")


def page(rows: list[T], limit: int, kind: str, key: Any) -> Page[T]:
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    items = rows[:limit]
    return Page(items=items, next_cursor=_encode_cursor(kind, key(items[-1])))


def _encode_cursor(kind: str, after: int | list[int]) -> str:
    raw = json.dumps({"k": kind, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_cursor(cursor: str | None, kind: str) -> Any:
    """The position a cursor of listing ``kind`` resumes after: an int, or for the
    evaluation listings a ``[version, id]`` pair."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        after = data["a"]
        shape_ok = (
            _is_int(after)
            if kind in ("edits", "versions", "guard_decisions", "jobs")
            else isinstance(after, list) and len(after) == 2 and all(map(_is_int, after))
        )
        ok = data["k"] == kind and shape_ok
    except (binascii.Error, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise InvalidInput("cursor", f"is not a cursor returned by this {kind} listing")
    return after
