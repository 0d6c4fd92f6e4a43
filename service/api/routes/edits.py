"""Edits: submit fact corrections (a job), list the model's edits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi import status as http

from service import ledger
from service.api.auth import EditsWrite, Reads
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, Cursor, Limit, SessionDep
from service.ledger.tables import EditStatus
from service.schemas import EditCreate, EditJobCreated, EditPublic, EditsPublic

router = APIRouter(tags=["edits"])


@router.post("/v1/models/{model}/edits", status_code=http.HTTP_202_ACCEPTED, responses=WORK_ERRORS)
def create_edits(
    model: str,
    body: EditCreate,
    backends: BackendsDep,
    response: Response,
    who: EditsWrite,
) -> EditJobCreated:
    """Queue one job applying ``requests`` with ``method`` (ROME: one version per
    request, in order; MEMIT: batches of at most the model's ``max_batch`` requests,
    one version each, possibly shared with other jobs' requests unless ``batching``
    is ``alone``). Poll ``/v1/jobs/{job_id}``. With an ``Idempotency-Key``, the same
    request again returns the same job."""
    job = backends.replayed(model, "edits", body)
    if job is None:
        job = ledger.create_edit_job(
            backends.session,
            model,
            body.method,
            body.hparams,
            body.requests,
            max_requests=backends.settings.max_requests_per_edit,
            batching=body.batching,
        )
        job = backends.commit_and_queue(model, job, response, requested_by=who)
    else:
        backends.queue(model, job, response)
    return EditJobCreated(
        job_id=job.id, edit_ids=[e.id for e in job.edits], worker=backends.worker(model)
    )


@router.get("/v1/models/{model}/edits", responses=ERRORS)
def list_edits(
    model: str,
    session: SessionDep,
    _: Reads,
    status: Annotated[EditStatus | None, Query(description="only edits in this status")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> EditsPublic:
    """The model's edits, oldest first, ``limit`` per page."""
    page = ledger.list_edits(session, model, status=status, limit=limit, cursor=cursor)
    return EditsPublic(
        items=[EditPublic.model_validate(e) for e in page.items], next_cursor=page.next_cursor
    )
