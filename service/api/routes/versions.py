"""Versions: list them (filtered; CSV), read one with its edits and guard decision,
their time series for charts, roll back to one, and the guard's decisions on the
updates staged on them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response
from fastapi import status as http

from service import ledger
from service.api.auth import EditsWrite, Reads
from service.api.csvout import CSV_RESPONSE, Format, csv_response
from service.api.deps import ERRORS, WORK_ERRORS, BackendsDep, Cursor, Limit, SessionDep
from service.ledger import history
from service.ledger.tables import VersionKind
from service.schemas import (
    MAX_INT,
    EditPublic,
    GuardDecisionPublic,
    GuardDecisionsPublic,
    JobCreated,
    RollbackCreate,
    SeriesPublic,
    VersionDetailPublic,
    VersionPublic,
    VersionsPublic,
)

router = APIRouter(tags=["versions"])


@router.get(
    "/v1/models/{model}/versions",
    responses={**ERRORS, **CSV_RESPONSE},
    response_model=VersionsPublic,
)
def list_versions(
    model: str,
    session: SessionDep,
    _: Reads,
    kind: Annotated[VersionKind | None, Query(description="only versions of this kind")] = None,
    since: Annotated[datetime | None, Query(description="committed at or after")] = None,
    until: Annotated[datetime | None, Query(description="committed before")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    format: Format = "json",
) -> VersionsPublic | Response:
    """The model's versions by ascending number (0 is the base weights), filtered."""
    page = history.list_versions(
        session, model, kind=kind, since=since, until=until, limit=limit, cursor=cursor
    )
    items = [VersionPublic.model_validate(v) for v in page.items]
    if format == "csv":
        return csv_response(items, page.next_cursor, f"{model}-versions")
    return VersionsPublic(items=items, next_cursor=page.next_cursor)


@router.get("/v1/models/{model}/versions/{number}", responses=ERRORS)
def get_version(
    model: str,
    number: Annotated[int, Path(ge=0, le=MAX_INT)],
    session: SessionDep,
    _: Reads,
) -> VersionDetailPublic:
    """One version with the edits it applied (and their metrics) and the guard's
    decision on its update."""
    found = history.get_version(session, model, number)
    base = VersionPublic.model_validate(found.version).model_dump()
    return VersionDetailPublic(
        **base,
        info=found.version.info or {},
        edits=[EditPublic.model_validate(e) for e in found.edits],
        guard_decision=(
            None
            if found.guard_decision is None
            else GuardDecisionPublic.model_validate(found.guard_decision)
        ),
    )


SeriesName = Literal["drift", "update_norm", "edit_scores", "evaluations"]


@router.get("/v1/models/{model}/series/{name}", responses=ERRORS)
def get_series(
    model: str,
    name: SeriesName,
    session: SessionDep,
    _: Reads,
    suite: Annotated[
        str | None, Query(max_length=32, description="evaluations: the suite to draw")
    ] = None,
) -> SeriesPublic:
    """A time series over the model's versions, ready for a chart: ``drift`` (one
    series per edited parameter), ``update_norm``, ``edit_scores`` (the mean
    efficacy, paraphrase and neighbourhood scores of each version's edits) or
    ``evaluations`` (``?suite=``: each metric of the suite's latest run per version,
    with the policy's thresholds)."""
    found = history.series(session, model, name, suite)
    return SeriesPublic(name=found.name, x=found.x, series=found.series,
                        thresholds=found.thresholds)  # fmt: skip


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


@router.get(
    "/v1/models/{model}/guard-decisions",
    responses={**ERRORS, **CSV_RESPONSE},
    response_model=GuardDecisionsPublic,
)
def list_guard_decisions(
    model: str,
    session: SessionDep,
    _: Reads,
    accepted: Annotated[
        bool | None, Query(description="only accepted (true) or rejected (false) updates")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    format: Format = "json",
) -> GuardDecisionsPublic | Response:
    """The guard's decisions on the model's staged updates, oldest first, with their
    measurements (docs/guard.md): the ``accepted=false`` ones are the updates it kept
    from landing."""
    page = ledger.list_guard_decisions(
        session, model, accepted=accepted, limit=limit, cursor=cursor
    )
    items = [GuardDecisionPublic.model_validate(d) for d in page.items]
    if format == "csv":
        return csv_response(items, page.next_cursor, f"{model}-guard-decisions")
    return GuardDecisionsPublic(items=items, next_cursor=page.next_cursor)
