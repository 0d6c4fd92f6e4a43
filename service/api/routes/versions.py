"""Versions: list them, roll back to one, and the guard's decisions on the updates
staged on them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi import status as http

from service import ledger
from service.api.auth import EditsWrite, Reads
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, Cursor, Limit, SessionDep
from service.schemas import (
    GuardDecisionPublic,
    GuardDecisionsPublic,
    JobCreated,
    RollbackCreate,
    VersionPublic,
    VersionsPublic,
)

router = APIRouter(tags=["versions"])


@router.get("/v1/models/{model}/versions", responses=ERRORS)
def list_versions(
    model: str, session: SessionDep, _: Reads, limit: Limit = 50, cursor: Cursor = None
) -> VersionsPublic:
    """The model's versions by ascending number (0 is the base weights)."""
    page = ledger.list_versions(session, model, limit=limit, cursor=cursor)
    return VersionsPublic(
        items=[VersionPublic.model_validate(v) for v in page.items], next_cursor=page.next_cursor
    )


@router.post(
    "/v1/models/{model}/rollback", status_code=http.HTTP_202_ACCEPTED, responses=WORK_ERRORS
)
def create_rollback(
    model: str,
    body: RollbackCreate,
    backends: BackendsDep,
    response: Response,
    who: EditsWrite,
) -> JobCreated:
    """Queue a job appending a version whose weights equal ``to_version``'s."""
    job = backends.replayed(model, "rollback", body)
    if job is None:
        job = ledger.create_rollback_job(backends.session, model, body.to_version)
        job = backends.commit_and_queue(model, job, response, requested_by=who)
    else:
        backends.queue(model, job, response)
    return JobCreated(job_id=job.id, worker=backends.worker(model))


@router.get("/v1/models/{model}/guard-decisions", responses=ERRORS)
def list_guard_decisions(
    model: str,
    session: SessionDep,
    _: Reads,
    accepted: Annotated[
        bool | None, Query(description="only accepted (true) or rejected (false) updates")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> GuardDecisionsPublic:
    """The guard's decisions on the model's staged updates, oldest first, with their
    measurements (docs/guard.md): the ``accepted=false`` ones are the updates it kept
    from landing."""
    page = ledger.list_guard_decisions(
        session, model, accepted=accepted, limit=limit, cursor=cursor
    )
    return GuardDecisionsPublic(
        items=[GuardDecisionPublic.model_validate(d) for d in page.items],
        next_cursor=page.next_cursor,
    )
