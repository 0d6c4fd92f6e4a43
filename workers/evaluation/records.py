"""The records an evaluation suite scores (``counterfact``, ``zsre``): given inline as
``records`` or read from the JSONL file ``data_path`` (the job resolves it under the
worker's data root), from ``offset`` (default 0), at most ``limit``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PARAMS = frozenset({"records", "data_path", "offset", "limit"})


def select_records(params: Mapping[str, Any], suite: str) -> list[dict[str, Any]]:
    """The records ``params`` select; ``ValueError`` naming the problem otherwise."""
    unknown = set(params) - PARAMS
    if unknown:
        raise ValueError(f"unknown {suite} params: {', '.join(sorted(unknown))}")
    offset, limit = params.get("offset", 0) or 0, params.get("limit")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError("offset must be an integer ≥ 0")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError("limit must be a positive integer")
    records, path = params.get("records"), params.get("data_path")
    if (records is None) == (path is None):
        raise ValueError("give either records or data_path (exactly one)")
    stop = None if limit is None else offset + limit
    if records is not None:
        if isinstance(records, str | bytes | Mapping) or not isinstance(records, Sequence):
            raise ValueError(f"records must be a list of {suite} records")
        return [dict(r) if isinstance(r, Mapping) else r for r in list(records)[offset:stop]]
    return list(_jsonl(Path(path), offset, stop))


def _jsonl(path: Path, offset: int, stop: int | None) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    n = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if stop is not None and n >= stop:
                return
            if n >= offset:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path.name} line {lineno} is not JSON: {exc}") from None
            n += 1
