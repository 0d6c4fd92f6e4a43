"""Evaluations: run a suite on a version (a job), read the runs and the alerts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi import status as http

from service import ledger
from service.api.auth import Evaluations, Reads
from service.api.csvout import CSV_RESPONSE, Format, csv_response
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, Cursor, Limit, SessionDep
from service.ledger.tables import Evaluation
from service.schemas import (
    MAX_INT,
    EvaluationCreate,
    EvaluationJobCreated,
    EvaluationPublic,
    EvaluationsPublic,
)
from service.suites import SuiteName

router = APIRouter(tags=["evaluations"])


@router.post(
    "/v1/models/{model}/evaluations", status_code=http.HTTP_202_ACCEPTED, responses=WORK_ERRORS
)
def create_evaluation(
    model: str,
    body: EvaluationCreate,
    backends: BackendsDep,
    response: Response,
    who: Evaluations,
) -> EvaluationJobCreated:
    """Queue a job running ``suite`` on ``version`` (default: the head now). The
    result is stored against that version; poll ``/v1/jobs/{job_id}`` or list the
    model's evaluations."""
    job = backends.replayed(model, "evaluations", body)
    if job is None:
        job, _ = ledger.create_evaluation_job(
            backends.session, model, body.suite, body.version, body.params
        )
        job = backends.commit_and_queue(model, job, response, evaluation=True, requested_by=who)
    else:
        backends.queue(model, job, response, evaluation=True)
    evaluation = ledger.evaluation_of_job(backends.session, job.id)
    return EvaluationJobCreated(
        job_id=job.id,
        evaluation_id=evaluation.id,
        version=evaluation.version,
        worker=backends.worker(model),
    )


@router.get(
    "/v1/models/{model}/evaluations",
    responses={**ERRORS, **CSV_RESPONSE},
    response_model=EvaluationsPublic,
)
def list_evaluations(
    model: str,
    session: SessionDep,
    _: Reads,
    suite: Annotated[SuiteName | None, Query(description="only this suite")] = None,
    version: Annotated[int | None, Query(ge=0, le=MAX_INT, description="only this version")] = None,
    details: Annotated[bool, Query(description="include each run's details")] = False,
    limit: Limit = 50,
    cursor: Cursor = None,
    format: Format = "json",
) -> EvaluationsPublic | Response:
    """The model's evaluations as a time series: by version, then in the order asked."""
    page = ledger.list_evaluations(
        session, model, suite, version=version, limit=limit, cursor=cursor
    )
    items = [_public(e, details) for e in page.items]
    if format == "csv":
        return csv_response(items, page.next_cursor, f"{model}-evaluations")
    return EvaluationsPublic(items=items, next_cursor=page.next_cursor)


@router.get("/v1/models/{model}/evaluations/{evaluation_id}", responses=ERRORS)
def get_evaluation(
    model: str,
    evaluation_id: Annotated[int, Path(ge=1, le=MAX_INT)],
    session: SessionDep,
    _: Reads,
) -> EvaluationPublic:
    """One evaluation with its details."""
    return _public(ledger.get_evaluation(session, model, evaluation_id), True)


@router.get("/v1/models/{model}/alerts", responses=ERRORS)
def list_alerts(
    model: str,
    session: SessionDep,
    _: Reads,
    suite: Annotated[SuiteName | None, Query(description="only this suite")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> EvaluationsPublic:
    """The evaluations that raised an alert (a threshold breached, or a thresholded
    metric missing), by version; ``alert`` says what was done about it."""
    page = ledger.list_evaluations(
        session, model, suite, alerts_only=True, limit=limit, cursor=cursor
    )
    return EvaluationsPublic(
        items=[_public(e, False) for e in page.items], next_cursor=page.next_cursor
    )


def _public(row: Evaluation, details: bool) -> EvaluationPublic:
    public = EvaluationPublic.model_validate(row)
    return public if details else public.model_copy(update={"details": None})
