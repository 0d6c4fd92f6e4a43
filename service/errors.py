"""Domain errors raised by the ledger, the queue and validation code.

Library code raises these, never ``HTTPException``; :mod:`service.api` maps them to
HTTP statuses in one exception handler. Every error names the ``field`` it is
about (a dotted path into the request, such as ``requests.0.prompt``, or a path
parameter such as ``model``), so that every 4xx body names the field.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: ``field`` names the offending input, ``message`` says what is wrong."""

    status_code = 500
    error_type = "error"

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (``Retry-After``, ``WWW-Authenticate``)."""
        return {}


class NotFound(ServiceError):
    """The named model, job or version does not exist (HTTP 404)."""

    status_code = 404
    error_type = "not_found"


class Unauthorized(ServiceError):
    """No key, or one the ledger does not know (HTTP 401, ``WWW-Authenticate: Bearer``)."""

    status_code = 401
    error_type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """The key lacks the route's scope, or the client may not use the API (HTTP 403)."""

    status_code = 403
    error_type = "forbidden"


class RateLimited(ServiceError):
    """Too many work-creating requests from one key in the current minute (HTTP 429,
    with ``Retry-After``)."""

    status_code = 429
    error_type = "rate_limited"

    def __init__(self, field: str | None, message: str, *, retry_after_s: int) -> None:
        super().__init__(field, message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Conflict(ServiceError):
    """The request contradicts the ledger's current state (HTTP 409)."""

    status_code = 409
    error_type = "conflict"


class InvalidInput(ServiceError):
    """The input is well-formed JSON but not acceptable (HTTP 422)."""

    status_code = 422
    error_type = "invalid_input"


class Unavailable(ServiceError):
    """A backing service (Postgres, Redis) did not answer (HTTP 503)."""

    status_code = 503
    error_type = "unavailable"


class WorkerUnavailable(Unavailable):
    """No worker can answer a score/generate request now: none serves the model, or
    the one that does did not answer within the API's wait (it is starting, or busy
    with an edit). HTTP 503 with ``Retry-After``; ``worker`` is the model's worker
    state (:meth:`service.presence.ModelWorker.public`)."""

    error_type = "worker_unavailable"

    def __init__(
        self, field: str | None, message: str, *, worker: dict[str, Any], retry_after_s: int
    ) -> None:
        super().__init__(field, message)
        self.worker = worker
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class WorkerFailed(ServiceError):
    """The worker raised while answering a synchronous request (HTTP 502)."""

    status_code = 502
    error_type = "worker_failed"
