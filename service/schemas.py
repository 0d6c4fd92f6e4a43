"""Request and response bodies of the HTTP API (pydantic v2).

Requests forbid unknown fields, so a misspelt field (``"paraphrases"``) is a 422
naming it rather than silently ignored. Surrounding whitespace of prompts,
subjects and targets is removed; targets carry no leading space (the methods and
the metrics prepend one, as CounterFact does).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.evaluations import EvaluationPolicies, SuiteName
from service.models import EditStatus, JobKind, JobStatus, VersionKind
from service.validation import CompletePrompt, Template, Text

MAX_PROMPT_LIST = 64  # paraphrase or neighbourhood prompts per request
DEFAULT_NEW_TOKENS = 20  # generate's max_new_tokens when the client gives none

Batching = Literal["auto", "alone"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- workers --------------------------------------------------------------------------

WorkerStateName = Literal["no worker", "loading", "statistics", "ready", "unknown"]


class WorkerPublic(BaseModel):
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


# -- edits ----------------------------------------------------------------------------


class EditRequestIn(_Input):
    """One fact correction: ``prompt.format(subject)`` should continue with ``target_new``."""

    prompt: Template = Field(
        description="template with exactly one {} where the subject goes",
        examples=["{} is located in"],
    )
    subject: Text = Field(examples=["The Eiffel Tower"])
    target_new: Text = Field(examples=["Rome"])
    target_true: Text | None = Field(None, examples=["Paris"])
    paraphrase_prompts: list[CompletePrompt] = Field(
        default_factory=list,
        max_length=MAX_PROMPT_LIST,
        description="complete prompts that should also continue with target_new",
        examples=[["The Eiffel Tower stands in the city of"]],
    )
    neighborhood_prompts: list[CompletePrompt] = Field(
        default_factory=list,
        max_length=MAX_PROMPT_LIST,
        description="complete prompts about other subjects that should keep target_true",
        examples=[["The Louvre is located in"]],
    )


class EditCreate(_Input):
    method: str = Field(description="editing method id", examples=["rome"])
    requests: list[EditRequestIn] = Field(min_length=1)
    hparams: dict[str, Any] | None = Field(
        None,
        description="hyper-parameter overrides for the method (keys of its hparams)",
        examples=[{"v_num_grad_steps": 20}],
    )
    batching: Batching = Field(
        "auto",
        description=(
            "auto: the model's writer may apply these requests in one version together "
            "with other queued requests of the same method and hparams, up to the "
            "model's max_batch; alone: never together with another job's requests"
        ),
    )


class EditJobCreated(BaseModel):
    job_id: str
    edit_ids: list[int]
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class EditPublic(BaseModel):
    id: int
    job_id: str
    method: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    status: EditStatus
    version: int | None = Field(description="number of the version that applied the edit")
    metrics: dict[str, Any] | None
    reason: str | None
    created_at: datetime


class EditsPublic(BaseModel):
    items: list[EditPublic]
    next_cursor: str | None


# -- jobs -----------------------------------------------------------------------------


class JobCreated(BaseModel):
    job_id: str
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class JobPublic(BaseModel):
    id: str
    kind: JobKind
    model: str
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    message: str | None
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# -- versions and rollback ------------------------------------------------------------


class VersionPublic(BaseModel):
    number: int
    kind: VersionKind
    method: str | None
    hparams: dict[str, Any] | None
    parent_number: int | None
    job_id: str | None
    created_at: datetime
    drift: dict[str, float] = Field(description="edited parameter -> ||W - W0||_F / rows")
    update_norm: float | None
    tensor_sha256: dict[str, str]
    timing: dict[str, float]


class VersionsPublic(BaseModel):
    items: list[VersionPublic]
    next_cursor: str | None


class RollbackCreate(_Input):
    to_version: int = Field(ge=0, description="an existing version number of this model")


# -- models ---------------------------------------------------------------------------


class ModelPublic(BaseModel):
    name: str
    source: str
    architecture: str | None = Field(description="model_type, known once a worker loaded it")
    head_version: int | None = Field(
        description="newest version number (0, the base weights, from the start)"
    )
    policy: dict[str, Any] = Field(
        description=(
            "snapshot_every, the batching policy max_batch / max_wait_ms, and "
            "evaluations (suites run every N versions, with thresholds)"
        )
    )
    worker: WorkerPublic = Field(description="what the model's worker is doing")


class PolicyUpdate(_Input):
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


# -- evaluations ----------------------------------------------------------------------


class EvaluationCreate(_Input):
    suite: SuiteName = Field(examples=["counterfact"])
    version: int | None = Field(
        None, ge=0, description="the version to evaluate (default: the head now)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the suite's parameters (docs/api.md, Evaluations)",
        examples=[{"data_path": "counterfact_dev.jsonl", "limit": 100}],
    )


class EvaluationJobCreated(BaseModel):
    job_id: str
    evaluation_id: int
    version: int
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class EvaluationPublic(BaseModel):
    id: int
    job_id: str
    suite: str
    version: int
    params: dict[str, Any]
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
    timing: dict[str, float]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationsPublic(BaseModel):
    items: list[EvaluationPublic]
    next_cursor: str | None


class GuardDecisionPublic(BaseModel):
    """The guard's judgement of one staged update (docs/guard.md)."""

    id: int
    job_id: str
    version: int | None = Field(description="the version that committed it; null: rejected")
    parent_version: int = Field(description="the version the update was staged on")
    method: str
    accepted: bool
    reason: str | None
    rules: list[str] = Field(description="the rules that rejected it")
    edit_ids: list[int]
    update_norm: float | None
    norm_median: float | None
    norm_ratio: float | None
    perplexity_before: float | None
    perplexity_after: float | None
    recall_before: float | None
    recall_after: float | None
    measurements: dict[str, Any] = Field(description="every number, skipped rules, the policy")
    seconds: float | None = Field(description="what the guard added to the edit")
    created_at: datetime


class GuardDecisionsPublic(BaseModel):
    items: list[GuardDecisionPublic]
    next_cursor: str | None


# -- synchronous reads ----------------------------------------------------------------


class ScoreRequest(_Input):
    prompts: list[Text] = Field(min_length=1, examples=[["The Eiffel Tower is located in"]])
    targets: list[Text] = Field(min_length=1, examples=[["Rome"]])


class ScoreResponse(BaseModel):
    logprobs: list[float] = Field(
        description='mean per-token log-probability of " " + target after each prompt'
    )
    version: int


class GenerateRequest(_Input):
    prompt: Text = Field(examples=["The Eiffel Tower is located in"])
    max_new_tokens: int | None = Field(
        None, ge=1, description=f"default {DEFAULT_NEW_TOKENS} (or the server's maximum, if lower)"
    )


class GenerateResponse(BaseModel):
    text: str
    version: int


# -- errors ---------------------------------------------------------------------------


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
