"""Jobs: what the queue runs (edits, rollbacks, evaluations)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from service.enums import JobKind, JobStatus
from service.schemas.common import Fraction, ModelName, Public
from service.schemas.workers import WorkerPublic


class JobCreated(Public):
    job_id: str
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class JobPublic(Public):
    id: str
    kind: JobKind
    model: ModelName
    status: JobStatus
    progress: Fraction = Field(ge=0, le=1)
    message: str | None
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    requested_by: str | None = Field(None, description="the name of the API key that asked for it")
    cancel_requested: bool = Field(
        False, description="an operator asked to cancel it while it ran: it stops at a safe point"
    )


class JobPage(Public):
    items: list[JobPublic]
    next_cursor: str | None


class EventPublic(Public):
    """One event of a job's or a model's stream (the ``data:`` line of an SSE event)."""

    id: int
    kind: str = Field(description="status, progress, version, rejection, evaluation or alert")
    job_id: str | None
    data: dict[str, Any]
    created_at: datetime
