"""``?format=csv`` of the listings: the page's items as CSV for spreadsheets, one row
per item, one column per field (nested objects and lists as JSON text); the next
page's cursor in the ``X-Next-Cursor`` header."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from fastapi.responses import Response
from pydantic import BaseModel

Format = Annotated[
    Literal["json", "csv"],
    Query(description="json (default), or csv: this page as a spreadsheet (X-Next-Cursor)"),
]
CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}}, "description": "the page (JSON, or CSV with ?format=csv)"}
}


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None:
        return ""
    return value


def csv_response(items: Sequence[BaseModel], next_cursor: str | None, name: str) -> Response:
    rows = [item.model_dump(mode="json") for item in items]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    headers = {"Content-Disposition": f'attachment; filename="{name}.csv"'}
    if next_cursor:
        headers["X-Next-Cursor"] = next_cursor
    return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
