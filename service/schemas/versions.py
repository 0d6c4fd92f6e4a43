"""Versions, rollback and the guard's decisions on staged updates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AliasChoices, Field

from service.enums import VersionKind
from service.schemas.common import (
    BodyInt,
    FiniteOrNone,
    FloatDict,
    Input,
    IntList,
    JsonDict,
    Public,
    StrDict,
    StrList,
    VersionNumber,
)
from service.schemas.edits import EditPublic


class VersionPublic(Public):
    number: int
    kind: VersionKind
    method: str | None
    hparams: dict[str, Any] | None
    parent_number: int | None
    job_id: str | None
    created_at: datetime
    drift: FloatDict = Field(description="edited parameter -> ||W - W0||_F / rows")
    update_norm: float | None
    tensor_sha256: StrDict
    timing: FloatDict
    requested_by: str | None = Field(None, description="the name of the API key that asked for it")


class VersionsPublic(Public):
    items: list[VersionPublic]
    next_cursor: str | None


class RollbackCreate(Input):
    to_version: BodyInt = Field(description="an existing version number of this model")


class GuardDecisionPublic(Public):
    """The guard's judgement of one staged update (docs/guard.md)."""

    id: int
    job_id: str
    version: VersionNumber = Field(description="the version that committed it; null: rejected")
    parent_version: int = Field(
        validation_alias=AliasChoices("parent_version", "parent_number"),
        description="the version the update was staged on",
    )
    method: str
    accepted: bool
    reason: str | None
    rules: StrList = Field(description="the rules that rejected it")
    edit_ids: IntList
    update_norm: FiniteOrNone
    norm_median: FiniteOrNone
    norm_ratio: FiniteOrNone
    perplexity_before: FiniteOrNone
    perplexity_after: FiniteOrNone
    recall_before: FiniteOrNone
    recall_after: FiniteOrNone
    measurements: JsonDict = Field(description="every number, skipped rules, the policy")
    seconds: float | None = Field(description="what the guard added to the edit")
    created_at: datetime


class GuardDecisionsPublic(Public):
    items: list[GuardDecisionPublic]
    next_cursor: str | None


class SeriesPublic(Public):
    """A time series over versions, as a chart draws it."""

    name: str = Field(description="drift, update_norm, edit_scores or evaluations")
    x: list[int] = Field(description="version numbers")
    series: dict[str, list[float | None]] = Field(
        description="one list per series, aligned with x (null: no value at that version)"
    )
    thresholds: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="evaluations: the model's policy thresholds per metric ({min?, max?})",
    )


class VersionDetailPublic(VersionPublic):
    """One version with the edits it applied and the guard's decision on it."""

    info: JsonDict = Field(description="the code version, drift_relative and other notes")
    edits: list[EditPublic] = Field(description="the edits this version applied")
    guard_decision: GuardDecisionPublic | None = Field(
        description="the guard's judgement of this version's update (null: none, e.g. a rollback)"
    )
