"""The statuses and kinds of the ledger's rows (stored as PostgreSQL enums by
:mod:`service.ledger.tables`, named by the API's schemas)."""

from __future__ import annotations

import enum

__all__ = ["ArtifactKind", "EditStatus", "JobKind", "JobStatus", "VersionKind"]


class JobKind(str, enum.Enum):
    edit = "edit"
    rollback = "rollback"
    evaluation = "evaluation"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class EditStatus(str, enum.Enum):
    queued = "queued"
    applied = "applied"
    rejected = "rejected"
    failed = "failed"
    reverted = "reverted"
    cancelled = "cancelled"


class VersionKind(str, enum.Enum):
    base = "base"
    edit = "edit"
    rollback = "rollback"


class ArtifactKind(str, enum.Enum):
    delta = "delta"
    snapshot = "snapshot"
    stats = "stats"
    # the context templates a worker sampled from the base weights (JSON)
    templates = "templates"
