"""The ``versions`` aggregate: a model's versions and the artifacts they name (delta
and snapshot files in the artifact store).

The API lists versions; the workers read the version tree (:func:`version_records`,
as :class:`~service.ledger.records.VersionRecord` values), number the next version
(:func:`next_number`, which refuses when the ledger moved under a worker) and add
versions with their artifacts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from service.errors import Conflict
from service.ledger import events, history
from service.ledger.paging import Page
from service.ledger.records import VersionRecord
from service.ledger.tables import Artifact, ArtifactKind, Job, Version, VersionKind

log = logging.getLogger(__name__)


def list_versions(
    session: Session, model_name: str, limit: int = 50, cursor: str | None = None
) -> Page[Version]:
    """A page of the model's versions by ascending number
    (:func:`service.ledger.history.list_versions` has the filters)."""
    return history.list_versions(session, model_name, limit=limit, cursor=cursor)


# -- the worker's side -------------------------------------------------------------------


class LedgerMoved(Conflict):
    """Another version was committed while a worker computed on its parent."""


class StoredFile(Protocol):
    """An artifact as the store wrote it (``service.artifacts.StoredArtifact``)."""

    path: str
    sha256: str
    size_bytes: int


def head_number(session: Session, model_id: int) -> int:
    """The model's newest version number (the model is registered: version 0 exists)."""
    return int(session.scalar(select(func.max(Version.number)).where(Version.model_id == model_id)))


def version_records(session: Session, model_id: int) -> dict[int, VersionRecord]:
    """Every version of the model as the runtime rebuilds it, by number."""
    rows = session.scalars(select(Version).where(Version.model_id == model_id)).all()
    ids = [r.delta_artifact_id for r in rows if r.delta_artifact_id] + [
        r.snapshot_artifact_id for r in rows if r.snapshot_artifact_id
    ]
    artifacts = {a.id: a for a in session.scalars(select(Artifact).where(Artifact.id.in_(ids)))}
    out: dict[int, VersionRecord] = {}
    for r in rows:
        delta = artifacts.get(r.delta_artifact_id) if r.delta_artifact_id else None
        snap = artifacts.get(r.snapshot_artifact_id) if r.snapshot_artifact_id else None
        out[r.number] = VersionRecord(
            number=r.number,
            kind=r.kind.value,
            parent_number=r.parent_number,
            delta_path=delta.path if delta else None,
            delta_sha256=delta.sha256 if delta else None,
            snapshot_path=snap.path if snap else None,
            snapshot_sha256=snap.sha256 if snap else None,
            tensor_sha256=dict(r.tensor_sha256 or {}),
        )
    return out


def next_number(session: Session, model_id: int, parent: int) -> int:
    """The number the next version gets, which must follow ``parent`` (the head the
    worker computed on); :class:`LedgerMoved` when another version came first."""
    head = head_number(session, model_id)
    if head != parent:
        raise LedgerMoved(
            "version",
            f"the ledger moved to version {head} while this job worked on version {parent}",
        )
    return head + 1


def add_artifact(
    session: Session, kind: ArtifactKind, stored: StoredFile, meta: Mapping[str, Any]
) -> Artifact:
    """The artifact row of a stored file (one per path: the path names the content)."""
    row = session.scalar(select(Artifact).where(Artifact.path == stored.path))
    if row is None:
        row = Artifact(
            kind=kind,
            path=stored.path,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            meta=dict(meta),
        )
        session.add(row)
        session.flush()
    return row


def templates_artifact(
    session: Session, fingerprint: str, spec: Sequence[Sequence[int]], seed: int
) -> Artifact | None:
    """The first stored context templates of the base ``fingerprint`` for ``spec``
    and ``seed`` (artifacts of kind ``templates``), or None."""
    meta = type_coerce(Artifact.meta, JSONB)
    return session.scalar(
        select(Artifact)
        .where(
            Artifact.kind == ArtifactKind.templates,
            meta["fingerprint"].astext == fingerprint,
            meta["spec"] == type_coerce([list(pair) for pair in spec], JSONB),
            meta["seed"].astext == str(seed),
        )
        .order_by(Artifact.id)
        .limit(1)
    )


def stats_artifact(session: Session, key: Mapping[str, str]) -> Artifact | None:
    """The first stored statistics file named by ``key`` (artifacts of kind ``stats``
    whose meta holds every field of ``key``: fingerprint, param, corpus, sizes, seed)."""
    meta = type_coerce(Artifact.meta, JSONB)
    return session.scalar(
        select(Artifact)
        .where(Artifact.kind == ArtifactKind.stats, meta.contains(dict(key)))
        .order_by(Artifact.id)
        .limit(1)
    )


@dataclass(frozen=True)
class NewVersion:
    """What a worker commits as a version (the edit's or the rollback's numbers)."""

    number: int
    kind: VersionKind
    parent_number: int
    job_id: str
    tensor_sha256: Mapping[str, str]
    drift: Mapping[str, float]
    timing: Mapping[str, float]
    info: Mapping[str, Any]
    update_norm: float | None = None
    method: str | None = None
    hparams: Mapping[str, Any] | None = None
    delta: StoredFile | None = None
    snapshot: StoredFile | None = None


def add_version(session: Session, model_id: int, new: NewVersion) -> Version:
    """Add the version row and the rows of its artifacts."""
    delta_id = snapshot_id = None
    if new.delta is not None:
        delta_id = add_artifact(session, ArtifactKind.delta, new.delta, {"method": new.method}).id
    if new.snapshot is not None:
        meta = {"version": new.number}
        snapshot_id = add_artifact(session, ArtifactKind.snapshot, new.snapshot, meta).id
    version = Version(
        model_id=model_id,
        number=new.number,
        kind=new.kind,
        parent_number=new.parent_number,
        job_id=new.job_id,
        method=new.method,
        hparams=dict(new.hparams) if new.hparams is not None else None,
        delta_artifact_id=delta_id,
        snapshot_artifact_id=snapshot_id,
        tensor_sha256=dict(new.tensor_sha256),
        drift=dict(new.drift),
        update_norm=new.update_norm,
        timing=dict(new.timing),
        info=dict(new.info),
        requested_by=(
            session.scalar(select(Job.requested_by).where(Job.id == new.job_id))
            if new.job_id is not None
            else None
        ),
    )
    session.add(version)
    session.flush()
    events.add(session, model_id, "version",
               {"number": new.number, "kind": new.kind.value, "parent": new.parent_number,
                "job_id": new.job_id}, new.job_id)  # fmt: skip
    return version
