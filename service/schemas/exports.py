"""Exports of a version (a Hugging Face folder or a patch) and imports of patches."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from service.enums import JobStatus
from service.schemas.common import BodyInt, Input, JsonDict, Public
from service.schemas.workers import WorkerPublic

ExportFormat = Literal["hf", "patch"]


class ExportCreate(Input):
    version: BodyInt | None = Field(None, description="the version to export (default: the head)")
    format: ExportFormat = Field(
        "hf",
        description="hf: a Hugging Face folder (config, tokenizer, safetensors weights, a "
        "model card); patch: the touched tensors against the base, with a manifest",
    )


class ExportCreated(Public):
    job_id: str
    export_id: str
    worker: WorkerPublic = Field(description="the model's worker now: the job waits for it")


class ExportPublic(Public):
    id: str
    job_id: str
    version: int
    format: ExportFormat
    status: JobStatus = Field(description="the export job's status")
    error: str | None = Field(None, description="why the job failed")
    size_bytes: int | None = Field(None, description="the archive's size, once written")
    sha256: str | None = Field(None, description="the archive's sha256, once written")
    manifest: JsonDict = Field(
        description="what the archive holds: model, version, base, edit count, and the "
        "files (hf) or the tensors and their encodings (patch)"
    )
    created_at: datetime
    finished_at: datetime | None
    download: str | None = Field(None, description="where to GET the tar archive, once written")


def export_public(row: Any, model: str) -> ExportPublic:
    """The public view of an export row (with its job and artifact loaded)."""
    artifact = row.artifact
    return ExportPublic(
        id=row.id,
        job_id=row.job_id,
        version=row.version,
        format=row.format,
        status=row.job.status,
        error=row.job.error,
        size_bytes=None if artifact is None else artifact.size_bytes,
        sha256=None if artifact is None else artifact.sha256,
        manifest=row.manifest or {},
        created_at=row.created_at,
        finished_at=row.finished_at,
        download=(
            None if artifact is None else f"/v1/models/{model}/exports/{row.id}/download"
        ),  # fmt: skip
    )
