"""What the routes share: the request's settings, ledger session and Redis clients
(FastAPI dependencies), the paging parameters, the documented error responses, and
the model's worker state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from redis import Redis
from sqlalchemy.orm import Session

from service import ledger, presence, queue
from service.schemas import ErrorPublic, WorkerPublic
from service.settings import Settings


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
Limit = Annotated[int, Query(ge=1, le=ledger.MAX_PAGE, description="page size")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "unknown model or job"},
    422: {"model": ErrorPublic, "description": "invalid input; names the field"},
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


@dataclass
class Backends:
    """What a route that writes the ledger and queues work needs: the request's ledger
    session, the Redis client for commands and the settings."""

    session: Session
    redis: Redis
    settings: Settings

    def worker(self, model: str) -> WorkerPublic:
        return worker_of(self.redis, self.settings, model)

    def commit_and_queue(
        self, model: str, job_id: str, response: Response, *, evaluation: bool = False
    ) -> None:
        """Commit the ledger first (the job exists before the queue hears of it), then
        queue the job on the model's edit (or evaluation) queue; ``Location`` names it."""
        self.session.commit()
        put = queue.enqueue_evaluation if evaluation else queue.enqueue_job
        put(self.redis, self.settings, model, job_id)
        response.headers["Location"] = f"/v1/jobs/{job_id}"


def _backends(session: SessionDep, redis: RedisDep, settings: SettingsDep) -> Backends:
    return Backends(session, redis, settings)


BackendsDep = Annotated[Backends, Depends(_backends)]
