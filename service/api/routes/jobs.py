"""Jobs: list them (newest first), poll one, cancel one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from service import ledger
from service.api.auth import Caller, allows, requires
from service.api.csvout import CSV_RESPONSE, Format, csv_response
from service.api.deps import ERRORS, Cursor, Limit, SessionDep
from service.errors import Forbidden
from service.ledger import job_control
from service.ledger.tables import JobKind, JobStatus
from service.schemas import ErrorPublic, JobPage, JobPublic

router = APIRouter(tags=["jobs"])

CANCEL_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    409: {
        "model": ErrorPublic,
        "description": "the job is finished, or a running rollback",
    },
}


@router.get(
    "/v1/jobs",
    responses={**ERRORS, **CSV_RESPONSE},
    response_model=JobPage,
    dependencies=[Depends(requires("reads"))],
)
def list_jobs(
    session: SessionDep,
    model: Annotated[str | None, Query(description="only this model's jobs")] = None,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    kind: Annotated[JobKind | None, Query(description="only jobs of this kind")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    format: Format = "json",
) -> JobPage | Response:
    """A page of jobs, newest first."""
    page = job_control.list_jobs(
        session, model_name=model, status=status, kind=kind, limit=limit, cursor=cursor
    )
    items = [JobPublic.model_validate(j) for j in page.items]
    if format == "csv":
        return csv_response(items, page.next_cursor, "jobs")
    return JobPage(items=items, next_cursor=page.next_cursor)


@router.get("/v1/jobs/{job_id}", responses=ERRORS, dependencies=[Depends(requires("reads"))])
def get_job(job_id: str, session: SessionDep) -> JobPublic:
    """A job's status, progress (0..1), error and result (new versions, per-edit metrics)."""
    return JobPublic.model_validate(ledger.get_job(session, job_id))


@router.post("/v1/jobs/{job_id}/cancel", responses=CANCEL_ERRORS)
def cancel_job(job_id: str, session: SessionDep, caller: Caller) -> JobPublic:
    """Cancel a queued job at once, or ask its worker to stop a running edit or
    evaluation job at its next safe point (``cancel_requested``; never half
    committed). Needs ``edits:write`` for an edit or rollback job, ``evaluations``
    for an evaluation job. 409 for a finished job or a running rollback."""
    if not (allows(caller, "edits:write") or allows(caller, "evaluations")):
        raise Forbidden("Authorization", "cancelling a job needs the scope 'edits:write' (edit and rollback jobs) or 'evaluations' (evaluation jobs)")  # fmt: skip
    job = ledger.get_job(session, job_id)
    scope = "evaluations" if job.kind is JobKind.evaluation else "edits:write"
    if not allows(caller, scope):
        raise Forbidden("Authorization", f"cancelling a {job.kind.value} job needs the scope {scope!r}")  # fmt: skip
    job_control.cancel_job(session, job_id)
    session.commit()
    return JobPublic.model_validate(ledger.get_job(session, job_id))
