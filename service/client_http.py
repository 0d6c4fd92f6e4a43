"""The HTTP side of :mod:`service.client`: errors, the description of one call, and
how an answer is parsed or retried."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from service.schemas import EventPublic, JobPublic

FINAL = ("succeeded", "failed", "cancelled")
WORK = "work"  # a POST that creates a job: it gets an Idempotency-Key


class ApiError(Exception):
    """The API answered an error (docs/api.md#errors)."""

    def __init__(self, status: int, body: Any, retry_after: float | None = None) -> None:
        detail = body.get("detail") if isinstance(body, dict) else str(body)
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.body = body
        self.detail = detail
        errors = body.get("errors") if isinstance(body, dict) else None
        self.field = errors[0].get("field") if errors else None
        self.retry_after = retry_after


class JobFailed(Exception):
    """A job that was waited for ended failed or cancelled."""

    def __init__(self, job: JobPublic) -> None:
        super().__init__(f"job {job.id} {job.status.value}: {job.error or job.message}")
        self.job = job


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    parse: Any = None  # a pydantic model, a list of one ([Model]), or None (JSON as is)
    params: Mapping[str, Any] | None = None
    body: Any = None
    work: bool = False


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _parse(call: _Call, response: httpx.Response) -> Any:
    if call.parse is str:
        return response.text
    data = response.json()
    if call.parse is None:
        return data
    if isinstance(call.parse, list):
        return [call.parse[0].model_validate(x) for x in data]
    return call.parse.model_validate(data)


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    after = response.headers.get("Retry-After")
    return ApiError(response.status_code, body, float(after) if after else None)


@dataclass(frozen=True)
class _Answer:
    value: Any


def _headers(call: _Call) -> dict[str, str]:
    """An Idempotency-Key for a POST that creates work: its retries make one job."""
    return {"Idempotency-Key": str(uuid.uuid4())} if call.work else {}


def _outcome(call: _Call, r: httpx.Response, attempt: int, retries: int) -> _Answer | float:
    """The parsed answer, or the seconds to wait before retrying a 429/503 that says
    when (``Retry-After``, at most 30 s); raises :class:`ApiError` otherwise."""
    if r.is_success:
        return _Answer(_parse(call, r))
    error = _error(r)
    if r.status_code in (429, 503) and error.retry_after is not None and attempt < retries:
        return float(min(error.retry_after, 30.0))
    raise error


def _events(lines: Iterator[str]) -> Iterator[EventPublic]:
    for line in lines:
        if line.startswith("data: "):
            yield EventPublic.model_validate(json.loads(line[6:]))
