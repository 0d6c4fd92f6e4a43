"""Logging for people and for log search.

``memedit api|worker|up --log-format json`` (or ``MEMEDIT_LOG_FORMAT=json``) writes one
JSON object per line: ``ts``, ``level``, ``logger``, ``message``, and what the line is
about when it is known — ``model``, ``job_id``, ``edit_ids``, ``version`` — from the
context a worker binds while it runs a job (:func:`bound`) or from a call's
``extra=``. ``exception`` holds a traceback. Plain text stays the default.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
FIELDS = ("model", "job_id", "edit_ids", "version")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "memedit_log_context", default=None
)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (of :data:`FIELDS`) to every log line written inside the block."""
    token = _context.set(
        {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    )
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_context.get() or {})
        for name in FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str, fmt: LogFormat = "text") -> None:
    """Configure the root logger for a memedit process."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name("memedit")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "memedit"]:
        root.removeHandler(old)  # set up again: replace our own handler, no other
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)


def uvicorn_formatters(config: dict[str, Any], fmt: LogFormat) -> dict[str, Any]:
    """uvicorn's logging config with JSON lines for its own and its access records."""
    if fmt == "json":
        for name in ("default", "access"):
            config["formatters"][name] = {"()": JsonFormatter}
    return config
