"""The ledger's tables (SQLAlchemy 2 declarative). Alembic owns the schema.

The ledger is append-only where it matters: versions are never deleted or
renumbered; a rollback appends a version. A model's state at version N is
derived: base weights (+ the snapshot nearest below N) + the ordered deltas.

- ``models``: one row per configured model name.
- ``jobs``: unit of work handed to a worker (edit, rollback). The row exists
  before the job is enqueued; Redis only carries its id.
- ``edits``: one requested fact correction, its status and metrics.
- ``versions``: numbered per model (unique). ``parent_number`` is the version
  whose state this one builds on: ``number - 1`` for an edit, ``to_version`` for
  a rollback (which carries no delta). Kind ``base`` is version 0.
- ``artifacts``: files in the artifact store (deltas, snapshots, statistics),
  named by sha256.
- ``evaluations``: one run of an evaluation suite on one version (its metrics,
  details and any alert); a job of kind ``evaluation`` runs it. ``policy`` names
  the model policy that queued it (unique per model, version and policy).
- ``guard_decisions``: one row per staged update the guard judged (accepted or
  rejected), with its measurements (docs/guard.md).
- ``exports``: one request to write a version out (a Hugging Face folder or a patch):
  its job, the tar archive (an artifact) and the archive's manifest.
- ``api_keys``: the API's keys (name, scopes, the sha256 of the secret); jobs,
  edits and versions record the name of the key that asked for them
  (``requested_by``).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sql_false
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# the statuses and kinds live outside the ledger package, so that the API's schemas can
# name them without importing the ledger (which imports the schemas)
from service.enums import ArtifactKind, EditStatus, JobKind, JobStatus, VersionKind

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The time now, in UTC (every timestamp of the ledger)."""
    return datetime.now(UTC)


def _uuid() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e])


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str | None] = mapped_column(String(64))
    # policy: snapshot_every, ... (per-model, JSON so later policies need no migration)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[Version]] = relationship(back_populates="model")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.queued, index=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    # input: method + hparams for edits, to_version for rollbacks
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the client's Idempotency-Key (unique per model) and the sha256 of what it asked
    # for: the same key again returns this job, with another request it is refused
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    # the name of the API key that asked for it (None: no keys were defined)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    # an operator asked to cancel it while it ran: the worker stops at a safe point
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=sql_false()
    )
    # the order jobs were created in (newest-first pages of GET /v1/jobs)
    seq: Mapped[int] = mapped_column(
        BigInteger, server_default=sql_text("nextval('jobs_seq_seq'::regclass)")
    )

    __table_args__ = (
        Index("uq_jobs_seq", "seq", unique=True),
        Index(
            "uq_jobs_model_idempotency_key",
            "model_id",
            "idempotency_key",
            unique=True,
            postgresql_where=sql_text("idempotency_key IS NOT NULL"),
        ),
    )

    edits: Mapped[list[Edit]] = relationship(back_populates="job", order_by="Edit.position")
    model: Mapped[Model] = relationship(viewonly=True)


class Edit(Base):
    __tablename__ = "edits"
    __table_args__ = (
        Index("ix_edits_model_status_id", "model_id", "status", "id"),
        Index("ix_edits_model_subject", "model_id", "subject"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order within the job
    method: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    target_new: Mapped[str] = mapped_column(Text)
    target_true: Mapped[str | None] = mapped_column(Text)
    paraphrase_prompts: Mapped[list[str]] = mapped_column(JSONType, default=list)
    neighborhood_prompts: Mapped[list[str]] = mapped_column(JSONType, default=list)
    status: Mapped[EditStatus] = mapped_column(
        _enum(EditStatus, "edit_status"), default=EditStatus.queued
    )
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    # efficacy/paraphrase/neighborhood after, pre_* before, plus per-prompt log-probs
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    reason: Mapped[str | None] = mapped_column(Text)
    # the later edit of the same subject and prompt that replaced this one (kept after
    # a rollback makes this one applied again: the status says which holds)
    superseded_by: Mapped[int | None] = mapped_column(
        ForeignKey("edits.id", name="fk_edits_superseded_by")
    )
    requested_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    job: Mapped[Job] = relationship(back_populates="edits")
    version: Mapped[Version | None] = relationship(back_populates="edits")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[ArtifactKind] = mapped_column(_enum(ArtifactKind, "artifact_kind"))
    # relative to the artifact store root
    path: Mapped[str] = mapped_column(Text, unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_versions_model_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[VersionKind] = mapped_column(_enum(VersionKind, "version_kind"))
    parent_number: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    method: Mapped[str | None] = mapped_column(String(32))
    hparams: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    delta_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    snapshot_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    # tensor name -> sha256 of its bytes after this version (every tensor for base;
    # every tensor edited so far on this model's chain otherwise)
    tensor_sha256: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    # layer parameter name -> ||W - W0||_F / rows
    drift: Mapped[dict[str, float]] = mapped_column(JSONType, default=dict)
    update_norm: Mapped[float | None] = mapped_column(Float)
    # seconds: compute, evaluate, total ...
    timing: Mapped[dict[str, float]] = mapped_column(JSONType, default=dict)
    # code version, model revision, worker host, etc.
    info: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # the key name of the job that made it (a batch's edits each record their own)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    edits: Mapped[list[Edit]] = relationship(back_populates="version")
    delta_artifact: Mapped[Artifact | None] = relationship(foreign_keys=[delta_artifact_id])
    snapshot_artifact: Mapped[Artifact | None] = relationship(foreign_keys=[snapshot_artifact_id])


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        # one run per version and policy (manual runs have no policy: NULLs are distinct)
        UniqueConstraint(
            "model_id", "version", "policy", name="uq_evaluations_model_version_policy"
        ),
        Index("ix_evaluations_model_suite_version", "model_id", "suite", "version", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    # the version evaluated: its number, and the row (which pins the number's meaning)
    version: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    suite: Mapped[str] = mapped_column(String(32))
    # the validated request; the worker's additions (resolved paths, the ledger's
    # edits for retention) are not stored here
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.queued
    )
    # flat {name: number}: the time series over versions, what thresholds compare
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    # the policy that queued the run (None: asked for over the API) and its
    # definition then (suite, params, every_versions, thresholds, action)
    policy: Mapped[str | None] = mapped_column(String(64))
    policy_spec: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # with thresholds: whether the metrics stayed within them (None: no thresholds
    # or not finished)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    # breaches, missing metrics, the action taken (rollback job, or why not)
    alert: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # seconds: sync, suite, total
    timing: Mapped[dict[str, float]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class GuardDecision(Base):
    """The guard's judgement of one staged update (docs/guard.md).

    ``version_id`` is the version that committed the update (None when rejected);
    ``parent_number`` the version it was staged on; ``edit_ids`` the requests of the
    update. The headline numbers are columns (for dashboards); ``measurements``
    holds all of them, the skipped rules and the policy used.
    """

    __tablename__ = "guard_decisions"
    __table_args__ = (Index("ix_guard_decisions_model_id_id", "model_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    parent_number: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    accepted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    # the rules that rejected: "norm", "perplexity", "recall"
    rules: Mapped[list[str]] = mapped_column(JSONType, default=list)
    edit_ids: Mapped[list[int]] = mapped_column(JSONType, default=list)
    update_norm: Mapped[float | None] = mapped_column(Float)
    norm_median: Mapped[float | None] = mapped_column(Float)
    norm_ratio: Mapped[float | None] = mapped_column(Float)
    perplexity_before: Mapped[float | None] = mapped_column(Float)
    perplexity_after: Mapped[float | None] = mapped_column(Float)
    recall_before: Mapped[float | None] = mapped_column(Float)
    recall_after: Mapped[float | None] = mapped_column(Float)
    measurements: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # seconds the guard added to the edit (canary measurements and the decision)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    version: Mapped[Version | None] = relationship(viewonly=True)


class Export(Base):
    """A version written out as a tar archive (docs/exports.md): ``format`` is ``hf``
    (a Hugging Face folder) or ``patch`` (the touched tensors against the base); its
    status is its job's; ``manifest`` summarises what the archive holds."""

    __tablename__ = "exports"
    __table_args__ = (Index("ix_exports_model_id_created_at", "model_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_uuid)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    format: Mapped[str] = mapped_column(String(16))
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    artifact: Mapped[Artifact | None] = relationship(viewonly=True)
    job: Mapped[Job] = relationship(viewonly=True)


class ApiKey(Base):
    """An API key: its name, scopes and the sha256 of its secret (the secret itself is
    shown once, when it is created, and never stored)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # the secret's first characters, to tell keys apart in listings
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """Something that happened to a job or a model, in order (``id``): a job's
    status and progress, a new version, a guard rejection, an evaluation and its
    alerts. The Server-Sent Events streams read these (service/ledger/events.py)."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_job_id_id", "job_id", "id"),
        Index("ix_events_model_id_id", "model_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
