"""Models: their head version, policy and worker."""

from __future__ import annotations

from pydantic import Field

from service.schemas.common import Input, JsonDict, Public
from service.schemas.workers import WorkerPublic
from service.suites import EvaluationPolicies


class ModelPublic(Public):
    name: str
    source: str
    architecture: str | None = Field(description="model_type, known once a worker loaded it")
    head_version: int | None = Field(
        description="newest version number (0, the base weights, from the start)"
    )
    policy: JsonDict = Field(
        description=(
            "snapshot_every, the batching policy max_batch / max_wait_ms, and "
            "evaluations (suites run every N versions, with thresholds)"
        )
    )
    worker: WorkerPublic = Field(description="what the model's worker is doing")


class PolicyUpdate(Input):
    """The model's evaluation policy; it replaces the previous one."""

    evaluations: EvaluationPolicies = Field(
        examples=[
            [
                {
                    "name": "retention",
                    "suite": "retention",
                    "every_versions": 10,
                    "thresholds": {"retention": {"min": 0.8}},
                    "action": "rollback",
                }
            ]
        ]
    )
