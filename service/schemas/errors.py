"""The one shape of every error body."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.schemas.workers import WorkerPublic


class ErrorItem(BaseModel):
    field: str | None = Field(
        description="dotted path of the offending input, e.g. requests.0.prompt"
    )
    message: str
    type: str


class ErrorPublic(BaseModel):
    detail: str = Field(description="the first error as '<field>: <message>'")
    errors: list[ErrorItem]
    worker: WorkerPublic | None = Field(
        None, description="on a 503 of score/generate: the model's worker state"
    )
