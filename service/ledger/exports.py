"""Exports and imports (docs/exports.md): a version written out as a tar archive (a
Hugging Face folder or a patch), and a patch from another deployment applied onto
this deployment's base.

The API creates the jobs (refusing, before anything is added, what cannot work: a
version with adaptor state, a patch made against another base); the worker runs
them (:mod:`workers.jobs.export`) and records the archive here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from service.errors import Conflict, InvalidInput, NotFound
from service.ledger import events
from service.ledger.jobs import add_job
from service.ledger.models import get_model, head_version_number, require_version
from service.ledger.tables import (
    Artifact,
    ArtifactKind,
    Export,
    JobKind,
    Model,
    Version,
    utcnow,
)
from service.ledger.versions import StoredFile, add_artifact

log = logging.getLogger(__name__)

FORMATS = ("hf", "patch")
# the prefix of the hashes of adaptor state that acts in the forward pass (GRACE)
_MODULE_STATE = "state:"


def _version_row(session: Session, model: Model, number: int) -> Version:
    row = session.scalar(
        select(Version).where(Version.model_id == model.id, Version.number == number)
    )
    assert row is not None  # require_version checked it
    return row


def create_export_job(
    session: Session, model_name: str, version: int | None, fmt: str
) -> tuple[Any, Export]:
    """An export job of ``version`` (None: the head) as ``fmt`` and its row;
    :class:`Conflict` for a version whose state is not weights alone."""
    if fmt not in FORMATS:
        raise InvalidInput("format", f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    model = get_model(session, model_name)
    number = head_version_number(session, model.id) if version is None else version
    if number is None:
        raise Conflict("model", f"model {model_name!r} has no versions yet")
    require_version(session, model, number, "version")
    row = _version_row(session, model, number)
    adaptors = sorted({k[len(_MODULE_STATE) :].split(".")[0] for k in row.tensor_sha256 or {}
                       if k.startswith(_MODULE_STATE)})  # fmt: skip
    if adaptors:
        raise Conflict(
            "version",
            f"version {number} holds {', '.join(adaptors)} adaptor state (a codebook that "
            "acts through a forward hook), which is not weights: neither a Hugging Face "
            "folder nor a patch can carry it. Export a version before its first "
            f"{adaptors[0]} edit, or make those edits with a weight method",
        )
    export_id = str(uuid.uuid4())
    job = add_job(session, model.id, JobKind.export,
                  {"export_id": export_id, "version": number, "format": fmt})  # fmt: skip
    export = Export(
        id=export_id, model_id=model.id, job_id=job.id, version=number, version_id=row.id,
        format=fmt,
    )  # fmt: skip
    session.add(export)
    session.flush()
    log.info("job %s: export of %s version %d as %s", job.id, model_name, number, fmt)
    return job, export


def get_export(session: Session, model_name: str, export_id: str) -> Export:
    """The export (with its job and artifact); :class:`NotFound` if the model has none
    with that id."""
    model = get_model(session, model_name)
    try:
        key = str(uuid.UUID(export_id))
    except ValueError:
        raise NotFound("export_id", f"unknown export {export_id!r}") from None
    row = session.scalar(
        select(Export)
        .options(joinedload(Export.job), joinedload(Export.artifact))
        .where(Export.id == key, Export.model_id == model.id)
    )
    if row is None:
        raise NotFound("export_id", f"model {model_name!r} has no export {export_id!r}")
    return row


def finish_export(
    session: Session, export_id: str, stored: StoredFile, manifest: Mapping[str, Any]
) -> None:
    """Record the export's archive (the worker, in the transaction that finishes the
    job)."""
    export = session.get(Export, export_id)
    if export is None:
        raise LookupError(f"export {export_id} is not in the ledger")
    artifact = add_artifact(session, ArtifactKind.export, stored,
                            {"export_id": export_id, "format": export.format})  # fmt: skip
    export.artifact_id = artifact.id
    export.manifest = dict(manifest)
    export.finished_at = utcnow()
    events.add(session, export.model_id, "export",
               {"export_id": export_id, "size_bytes": stored.size_bytes}, export.job_id)  # fmt: skip


# -- imports -----------------------------------------------------------------------------


def create_import_job(
    session: Session, model_name: str, stored: StoredFile, manifest: Mapping[str, Any]
) -> Any:
    """An import job of an uploaded patch (stored as ``stored``; its ``manifest``
    already read); :class:`Conflict` when the patch was made against another base
    than this model's version 0."""
    model = get_model(session, model_name)
    base = _version_row(session, model, 0).tensor_sha256 or {}
    tensors: Mapping[str, Any] = manifest.get("tensors") or {}
    missing = sorted(n for n in tensors if n not in base)
    differ = sorted(n for n, e in tensors.items()
                    if n in base and base[n] != (e or {}).get("base_sha256"))  # fmt: skip
    if missing or differ:
        what = (f"it touches {len(missing)} tensor(s) this base does not have, e.g. {missing[0]}"
                if missing else
                f"{len(differ)} tensor(s) differ from this base's, e.g. {differ[0]}")  # fmt: skip
        raise Conflict("patch", f"the patch was made against another base than {model_name!r}'s: {what}")  # fmt: skip
    artifact = add_artifact(session, ArtifactKind.upload, stored, {"model": model_name})
    job = add_job(
        session,
        model.id,
        JobKind.import_,
        {
            "artifact_id": artifact.id,
            "path": stored.path,
            "sha256": stored.sha256,
            "from_model": manifest.get("model"),
            "from_version": manifest.get("version"),
            "edits": len(manifest.get("edits") or []),
            "tensors": len(tensors),
        },
    )
    log.info("job %s: import of a patch of %d tensor(s) into %s", job.id, len(tensors), model_name)
    return job


def upload_artifact(session: Session, artifact_id: int) -> Artifact:
    row = session.get(Artifact, artifact_id)
    if row is None:
        raise LookupError(f"artifact {artifact_id} is not in the ledger")
    return row


def artifact_known(session: Session, path: str) -> bool:
    """Whether an artifact row names ``path`` (a refused upload of a file the ledger
    already knows is kept)."""
    return session.scalar(select(Artifact.id).where(Artifact.path == path)) is not None
