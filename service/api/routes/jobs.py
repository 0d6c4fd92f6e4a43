"""Jobs: poll one (status, progress, result)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service import ledger
from service.api.auth import requires
from service.api.deps import ERRORS, SessionDep
from service.schemas import JobPublic

router = APIRouter(tags=["jobs"], dependencies=[Depends(requires("reads"))])


@router.get("/v1/jobs/{job_id}", responses=ERRORS)
def get_job(job_id: str, session: SessionDep) -> JobPublic:
    """A job's status, progress (0..1), error and result (new versions, per-edit metrics)."""
    return JobPublic.model_validate(ledger.get_job(session, job_id))
