"""The statuses and kinds of the ledger's rows (stored as PostgreSQL enums by
:mod:`service.ledger.tables`, named by the API's schemas)."""

from __future__ import annotations

import enum

__all__ = ["ArtifactKind", "EditStatus", "JobKind", "JobStatus", "VersionKind"]


class JobKind(str, enum.Enum):
    edit = "edit"
    rollback = "rollback"
    evaluation = "evaluation"
    # a version written out as a Hugging Face folder or a patch (docs/exports.md)
    export = "export"
    # a patch from another deployment applied onto the base as a new version
    import_ = "import"


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
    superseded = "superseded"  # replaced by a later edit of the same subject and prompt
    cancelled = "cancelled"


class VersionKind(str, enum.Enum):
    base = "base"
    edit = "edit"
    rollback = "rollback"
    # a patch imported onto the base (parent 0): its delta sets the patched tensors
    import_ = "import"


class ArtifactKind(str, enum.Enum):
    delta = "delta"
    snapshot = "snapshot"
    stats = "stats"
    # the context templates a worker sampled from the base weights (JSON)
    templates = "templates"
    # an export's tar archive (a Hugging Face folder or a patch)
    export = "export"
    # a patch archive uploaded to be imported
    upload = "upload"
