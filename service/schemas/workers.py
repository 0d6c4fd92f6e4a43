"""The model's worker state, as the API shows it (service/presence.py publishes it)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from service.schemas.common import Public

WorkerStateName = Literal["no worker", "loading", "statistics", "ready", "unknown"]


class WorkerPublic(Public):
    """What the model's worker is doing (service/presence.py). ``loading``: the worker
    process started and loads the weights; ``statistics``: it computes the layer
    statistics and editor caches (``progress`` 0..1; it answers score/generate between
    steps when its weights are the head); ``ready``; ``no worker``; ``unknown`` when
    Redis did not answer. Edits, rollbacks and evaluations are accepted in every state
    and wait in the queue."""

    state: WorkerStateName
    workers: int = Field(0, description="live workers of the model")
    progress: float | None = Field(None, description="start-up progress, 0..1")
    message: str | None = None
    version: int | None = Field(None, description="the version the worker's weights are at")
    since: datetime | None = Field(None, description="when the worker entered this state")
