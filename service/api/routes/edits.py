"""Edits: submit fact corrections (a job), list the model's edits (filtered; CSV),
read one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi import status as http

from service import ledger
from service.api.auth import EditsWrite, Reads
from service.api.csvout import CSV_RESPONSE, Format, csv_response
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, Cursor, Limit, SessionDep
from service.ledger import history
from service.ledger.history import EditFilter
from service.ledger.tables import EditStatus
from service.schemas import MAX_INT, EditCreate, EditJobCreated, EditPublic, EditsPublic

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


@router.get(
    "/v1/models/{model}/edits", responses={**ERRORS, **CSV_RESPONSE}, response_model=EditsPublic
)
def list_edits(
    model: str,
    session: SessionDep,
    _: Reads,
    status: Annotated[EditStatus | None, Query(description="only edits in this status")] = None,
    subject: Annotated[
        str | None, Query(max_length=200, description="subjects containing this (any case)")
    ] = None,
    method: Annotated[str | None, Query(max_length=32, description="only this method's")] = None,
    since: Annotated[datetime | None, Query(description="accepted at or after")] = None,
    until: Annotated[datetime | None, Query(description="accepted before")] = None,
    min_version: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="applied by this version or a later one")
    ] = None,
    max_version: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="applied by this version or an earlier one")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    format: Format = "json",
) -> EditsPublic | Response:
    """The model's edits, oldest first, ``limit`` per page, filtered."""
    where = EditFilter(
        status=status,
        subject=subject,
        method=method,
        since=since,
        until=until,
        min_version=min_version,
        max_version=max_version,
    )
    page = history.list_edits(session, model, where, limit=limit, cursor=cursor)
    items = [EditPublic.model_validate(e) for e in page.items]
    if format == "csv":
        return csv_response(items, page.next_cursor, f"{model}-edits")
    return EditsPublic(items=items, next_cursor=page.next_cursor)


@router.get("/v1/models/{model}/edits/{edit_id}", responses=ERRORS)
def get_edit(
    model: str,
    edit_id: Annotated[int, Path(ge=0, le=MAX_INT)],
    session: SessionDep,
    _: Reads,
) -> EditPublic:
    """One edit: its request, status, the version that applied it and its metrics."""
    return EditPublic.model_validate(history.get_edit(session, model, edit_id))
