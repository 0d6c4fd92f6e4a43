"""Evaluation runs of a version (docs/evaluation.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from service.enums import JobStatus
from service.schemas.common import BodyInt, FloatDict, Input, JsonDict, Public
from service.schemas.workers import WorkerPublic
from service.suites import SuiteName


class EvaluationCreate(Input):
    suite: SuiteName = Field(examples=["counterfact"])
    version: BodyInt | None = Field(
        None, description="the version to evaluate (default: the head now)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the suite's parameters (docs/api.md, Evaluations)",
        examples=[{"data_path": "counterfact_dev.jsonl", "limit": 100}],
    )


class EvaluationJobCreated(Public):
    job_id: str
    evaluation_id: int
    version: int
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class EvaluationPublic(Public):
    id: int
    job_id: str
    suite: str
    version: int
    params: JsonDict
    status: JobStatus
    metrics: dict[str, Any] | None = Field(description="flat {name: number}")
    details: dict[str, Any] | None = Field(
        description="the suite's breakdown (listings include it only with details=true)"
    )
    error: str | None
    policy: str | None = Field(description="the policy that queued it; null when asked for")
    passed: bool | None = Field(description="within the policy's thresholds (null: none)")
    alert: dict[str, Any] | None = Field(
        description="breaches, missing metrics and the action taken"
    )
    timing: FloatDict
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationsPublic(Public):
    items: list[EvaluationPublic]
    next_cursor: str | None
