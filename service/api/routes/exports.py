"""Exports and imports (docs/exports.md): write a version out as a tar archive (a
Hugging Face folder or a patch), read the export, download its archive; upload a
patch from another deployment to apply it onto this base as a new version."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi import status as http
from fastapi.responses import FileResponse
from pydantic import BaseModel

from service.api.auth import EditsWrite, Reads
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, SessionDep, SettingsDep
from service.artifacts import ArtifactMissing, ArtifactStore
from service.enums import JobStatus
from service.errors import Conflict, InvalidInput, NotFound, ServiceError
from service.ledger import exports as ledger_exports
from service.patch_manifest import read_manifest
from service.schemas import ErrorPublic, JobCreated
from service.schemas.exports import ExportCreate, ExportCreated, ExportPublic, export_public

log = logging.getLogger(__name__)
router = APIRouter(tags=["exports"])

ExportId = Annotated[str, Path(max_length=64)]
TAR = "application/x-tar"


@router.post(
    "/v1/models/{model}/exports",
    status_code=http.HTTP_202_ACCEPTED,
    responses={
        **WORK_ERRORS,
        409: {
            "model": ErrorPublic,
            "description": "the version holds adaptor state (a GRACE codebook), which is "
            "not weights and cannot be exported",
        },  # fmt: skip
    },
)
def create_export(
    model: str,
    body: ExportCreate,
    backends: BackendsDep,
    response: Response,
    who: EditsWrite,
) -> ExportCreated:
    """Queue a job writing ``version`` (default: the head) out as ``format``: ``hf``,
    a Hugging Face folder that ``from_pretrained`` loads, or ``patch``, the touched
    tensors against the base for ``memedit apply-patch``. Poll the export, then GET
    its ``download``."""
    job = backends.replayed(model, "export", body)
    if job is None:
        job, _ = ledger_exports.create_export_job(backends.session, model, body.version,
                                                  body.format)  # fmt: skip
        job = backends.commit_and_queue(model, job, response, requested_by=who)
    else:
        backends.queue(model, job, response)
    export_id = str((job.payload or {})["export_id"])
    response.headers["Location"] = f"/v1/models/{model}/exports/{export_id}"
    return ExportCreated(job_id=job.id, export_id=export_id, worker=backends.worker(model))


@router.get("/v1/models/{model}/exports/{export_id}", responses=ERRORS)
def get_export(model: str, export_id: ExportId, session: SessionDep, _: Reads) -> ExportPublic:
    """The export: its job's status, and once written the archive's size, sha256,
    manifest and where to download it."""
    return export_public(ledger_exports.get_export(session, model, export_id), model)


@router.get(
    "/v1/models/{model}/exports/{export_id}/download",
    responses={
        **ERRORS,
        200: {"content": {TAR: {}}, "description": "the tar archive"},
        409: {"model": ErrorPublic, "description": "the export is not written (yet)"},
    },
    response_class=FileResponse,
)
def download_export(
    model: str, export_id: ExportId, session: SessionDep, settings: SettingsDep, _: Reads
) -> FileResponse:
    """The export's tar archive, streamed from the artifact store (``ETag``: its
    sha256)."""
    row = ledger_exports.get_export(session, model, export_id)
    if row.artifact is None:
        state = row.job.status.value
        why = f": {row.job.error}" if row.job.status is JobStatus.failed and row.job.error else ""
        raise Conflict("export_id", f"export {row.id} is {state}; it has no archive{why}")
    try:
        path = ArtifactStore(settings.artifact_dir).local_path(row.artifact.path)
    except ArtifactMissing:
        raise NotFound("export_id", f"the archive of export {row.id} is not in this API's artifact store ({settings.artifact_dir})") from None  # fmt: skip
    name = f"{model}-v{row.version}-{row.format}.tar"
    return FileResponse(path, media_type=TAR, filename=name,
                        headers={"ETag": f'"{row.artifact.sha256}"'})  # fmt: skip


class _Upload(BaseModel):
    sha256: str


@router.post(
    "/v1/models/{model}/imports",
    status_code=http.HTTP_202_ACCEPTED,
    responses={
        **WORK_ERRORS,
        409: {
            "model": ErrorPublic,
            "description": "the patch was made against another base",
        },  # fmt: skip
        413: {"model": ErrorPublic, "description": "the archive is over max_upload_bytes"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {TAR: {"schema": {"type": "string", "format": "binary"}}},
            "description": "a patch archive (memedit export --format patch)",
        }
    },
)
async def create_import(
    model: str, request: Request, backends: BackendsDep, response: Response, who: EditsWrite
) -> JobCreated:
    """Queue a job applying an uploaded patch archive onto this model's base: a new
    version of kind ``import`` whose tensors hash as the patch records, with the
    patch's edits as its applied edits. The body is the tar archive itself."""
    store = ArtifactStore(backends.settings.artifact_dir)
    stored = await _receive(request, store, backends.settings.max_upload_bytes)
    try:
        manifest = read_manifest(store.local_path(stored.path))
        job = backends.replayed(model, "import", _Upload(sha256=stored.sha256))
        if job is None:
            job = ledger_exports.create_import_job(backends.session, model, stored, manifest)
            job = backends.commit_and_queue(model, job, response, requested_by=who)
        else:
            backends.queue(model, job, response)
    except ServiceError:
        backends.session.rollback()
        _forget(backends, store, stored.path)
        raise
    return JobCreated(job_id=job.id, worker=backends.worker(model))


async def _receive(request: Request, store: ArtifactStore, cap: int) -> Any:
    """Stream the body into the store (kind ``upload``); 413 over ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _TooLarge(cap)
    scratch = store.scratch("upload-")
    target = scratch / "upload.tar"
    size = 0
    try:
        with target.open("wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _TooLarge(cap)
                f.write(chunk)
        if size == 0:
            raise InvalidInput("body", "the body is empty: send the patch archive")
        return store.put_file("upload", target, ".tar")
    finally:
        target.unlink(missing_ok=True)
        scratch.rmdir()


class _TooLarge(ServiceError):
    status_code = 413
    error_type = "too_large"

    def __init__(self, cap: int) -> None:
        super().__init__("body", f"the archive is larger than the limit of {cap} bytes (max_upload_bytes)")  # fmt: skip


def _forget(backends: Any, store: ArtifactStore, path: str) -> None:
    """Remove a refused upload unless the ledger names that file already."""
    if not ledger_exports.artifact_known(backends.session, path):
        with contextlib.suppress(ArtifactMissing):
            store.local_path(path).unlink(missing_ok=True)
