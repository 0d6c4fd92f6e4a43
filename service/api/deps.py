"""What the routes share: the request's settings, ledger session and Redis clients
(FastAPI dependencies), the paging parameters, the documented error responses, and
the model's worker state."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request, Response
from pydantic import BaseModel
from redis import Redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import ledger, presence, queue
from service.api.limits import admit
from service.errors import Unavailable
from service.ledger import idempotency
from service.ledger.tables import Job, JobStatus
from service.schemas import ErrorPublic, WorkerPublic
from service.settings import Settings

log = logging.getLogger(__name__)


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _reads_redis(request: Request) -> Redis:
    return request.app.state.reads_redis


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
# commands that return at once (enqueue, ping, worker state)
RedisDep = Annotated[Redis, Depends(_redis)]
# score/generate: blocks up to sync_timeout_s waiting for the worker's answer
ReadsRedisDep = Annotated[Redis, Depends(_reads_redis)]
# Retry-After of a 503 when the ledger database or Redis did not answer
BACKEND_RETRY_AFTER_S = 5
Limit = Annotated[int, Query(ge=1, le=ledger.MAX_PAGE, description="page size")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorPublic,
        "description": "keys are defined and none, or an unknown one, was sent",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {
        "model": ErrorPublic,
        "description": "the key lacks the route's scope, or no keys are defined and the "
        "client is not on loopback",
    },
    404: {"model": ErrorPublic, "description": "unknown model or job"},
    413: {"model": ErrorPublic, "description": "the request body is over max_body_bytes"},
    422: {"model": ErrorPublic, "description": "invalid input; names the field"},
    503: {"model": ErrorPublic, "description": "the ledger database (or Redis) did not answer"},
}
# the POSTs that create a job
WORK_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    429: {
        "model": ErrorPublic,
        "description": "over rate_limit_per_minute new jobs this minute; see Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
SYNC_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    502: {"model": ErrorPublic, "description": "the worker raised"},
    503: {
        "model": ErrorPublic,
        "description": (
            "no worker serves the model, or it did not answer within sync_timeout_s "
            "(starting, or busy); Retry-After says when to try again, worker its state"
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}


def worker_of(redis: Redis, settings: Settings, model: str) -> WorkerPublic:
    """The model's worker state now (service/presence.py)."""
    state = presence.model_worker(redis, settings.queue_prefix, model)
    return WorkerPublic.model_validate(state.public())


IDEMPOTENCY_KEY = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description=(
            "any string (visible ASCII, at most 255): the same key with the same request "
            "returns the same job; with another request, 422"
        ),
    ),
]


@dataclass
class Backends:
    """What a route that writes the ledger and queues work needs: the request's ledger
    session, the Redis client for commands, the settings, and the request's
    ``Idempotency-Key`` (None without one)."""

    session: Session
    redis: Redis
    settings: Settings
    key: str | None = None
    client: str = "unknown"
    _sha256: str | None = None

    def worker(self, model: str) -> WorkerPublic:
        return worker_of(self.redis, self.settings, model)

    def replayed(self, model: str, kind: str, body: BaseModel) -> Job | None:
        """With an ``Idempotency-Key``: the job an earlier request with this key and
        this body created (None if there is none; 422 for another body)."""
        if self.key is None:
            return None
        self._sha256 = idempotency.fingerprint(kind, body.model_dump(mode="json"))
        return idempotency.job_for_key(self.session, model, self.key, self._sha256)

    def admit(self, who: str | None) -> None:
        """Count a job about to be created against its key's rate limit (the client's
        address while no key is defined; service/api/limits.py)."""
        admit(self.redis, self.settings, who if who is not None else f"addr:{self.client}")

    def commit_and_queue(
        self,
        model: str,
        job: Job,
        response: Response,
        *,
        evaluation: bool = False,
        requested_by: str | None = None,
    ) -> Job:
        """Commit the new ``job`` (with the request's idempotency key, and the name of
        the API key that asked for it on the job and its edits), then queue it on the
        model's edit (or evaluation) queue; ``Location`` names it. Returns the job,
        or the one a concurrent request with the same key committed first.

        The ledger comes first: once the row is committed the answer is 202 even if
        Redis does not answer, since the writer's reconciler (workers/reconciler.py)
        enqueues ledger jobs that are missing from Redis."""
        self.admit(requested_by)  # over the limit: 429, nothing committed
        if self.key is not None and self._sha256 is not None:
            idempotency.remember(job, self.key, self._sha256)
        job.requested_by = requested_by
        for edit in job.edits:
            edit.requested_by = requested_by
        try:
            self.session.commit()
        except IntegrityError:
            if self.key is None or self._sha256 is None:
                raise
            self.session.rollback()  # the same key won a race: answer with its job
            log.info("job for key %r: another request committed it first", self.key)
            winner = idempotency.job_for_key(self.session, model, self.key, self._sha256)
            if winner is None:
                raise
            job = winner
        self.queue(model, job, response, evaluation=evaluation)
        return job

    def queue(self, model: str, job: Job, response: Response, *, evaluation: bool = False) -> None:
        """Queue a committed ``job`` (a no-op if Redis has it already, or if it is not
        queued any more); ``Location`` names it. A Redis that does not answer is
        logged, not raised: the job is in the ledger, the reconciler queues it."""
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        if job.status is not JobStatus.queued:
            return
        put = queue.enqueue_evaluation if evaluation else queue.enqueue_job
        try:
            put(self.redis, self.settings, model, job.id)
        except Unavailable as exc:
            log.warning("job %s is in the ledger; Redis did not take it: %s", job.id, exc)


def _backends(
    request: Request,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    key: IDEMPOTENCY_KEY = None,
) -> Backends:
    client = request.client.host if request.client else "unknown"
    return Backends(session, redis, settings, key, client)


BackendsDep = Annotated[Backends, Depends(_backends)]
