"""Edit requests and edits. Surrounding whitespace of prompts, subjects and targets
is removed; targets carry no leading space (the methods and the metrics prepend
one, as CounterFact does)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from service.enums import EditStatus
from service.schemas.common import Input, JsonDict, Public, StrList, VersionNumber
from service.schemas.workers import WorkerPublic
from service.validation import CompletePrompt, Template, Text

MAX_PROMPT_LIST = 64  # paraphrase or neighbourhood prompts per request

Batching = Literal["auto", "alone"]


class EditRequestIn(Input):
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


class EditCreate(Input):
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


class EditJobCreated(Public):
    job_id: str
    edit_ids: list[int]
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class EditPublic(Public):
    id: int
    job_id: str
    method: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    paraphrase_prompts: StrList
    neighborhood_prompts: StrList
    status: EditStatus
    version: VersionNumber = Field(description="number of the version that applied the edit")
    metrics: JsonDict | None
    reason: str | None
    superseded_by: int | None = Field(
        None, description="the later edit of the same subject and prompt that replaced this one"
    )
    created_at: datetime
    requested_by: str | None = Field(None, description="the name of the API key that asked for it")


class EditsPublic(Public):
    items: list[EditPublic]
    next_cursor: str | None
