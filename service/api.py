"""The HTTP API (FastAPI). Build it with :func:`create_app`; OpenAPI docs at ``/docs``.

Routes validate input (pydantic schemas, then the ledger's domain checks), write
the ledger, and hand work to the workers through :mod:`service.queue`. Domain
errors map to HTTP statuses in one place (:func:`_service_error`); every error
body has the same shape (:class:`~service.schemas.ErrorPublic`) and names the
field. This module imports neither torch nor :mod:`workers` (a test checks it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import status as http
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import ledger, presence, queue
from service.errors import InvalidInput, ServiceError, WorkerUnavailable
from service.evaluations import SuiteName
from service.models import Edit, EditStatus, Evaluation, Job, Model, Version
from service.redis_clients import blocking_client, command_client
from service.schemas import (
    DEFAULT_NEW_TOKENS,
    EditCreate,
    EditJobCreated,
    EditPublic,
    EditsPublic,
    ErrorItem,
    ErrorPublic,
    EvaluationCreate,
    EvaluationJobCreated,
    EvaluationPublic,
    EvaluationsPublic,
    GenerateRequest,
    GenerateResponse,
    GuardDecisionPublic,
    GuardDecisionsPublic,
    JobCreated,
    JobPublic,
    ModelPublic,
    PolicyUpdate,
    RollbackCreate,
    ScoreRequest,
    ScoreResponse,
    VersionPublic,
    VersionsPublic,
    WorkerPublic,
)
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "unknown model or job"},
    422: {"model": ErrorPublic, "description": "invalid input; names the field"},
}
_SYNC_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    502: {"model": ErrorPublic, "description": "the worker raised"},
    503: {
        "model": ErrorPublic,
        "description": (
            "no worker serves the model, or it did not answer within sync_timeout_s "
            "(starting, or busy); Retry-After says when to try again, worker its state"
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}


# -- dependencies ---------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def _redis(request: Request) -> Redis:
    return request.app.state.redis


def _reads_redis(request: Request) -> Redis:
    return request.app.state.reads_redis


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
# commands that return at once (enqueue, ping, worker state)
RedisDep = Annotated[Redis, Depends(_redis)]
# score/generate: blocks up to sync_timeout_s waiting for the worker's answer
ReadsRedisDep = Annotated[Redis, Depends(_reads_redis)]
Limit = Annotated[int, Query(ge=1, le=ledger.MAX_PAGE, description="page size")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]

router = APIRouter()


# -- app ------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API bound to ``settings`` (default: :func:`service.settings.get_settings`).

    The lifespan opens the database engine, registers the configured models
    (:func:`service.ledger.sync_models`) and opens two Redis clients: one for
    commands and one for the reads that wait for a worker
    (:mod:`service.redis_clients` says why and how long each may block).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            settings.database_url,
            pool_pre_ping=True,
            connect_args={"connect_timeout": _CONNECT_TIMEOUT_S},
        )
        sessions = sessionmaker(bind=engine, expire_on_commit=False)
        redis = command_client(settings.redis_url)
        reads_redis = blocking_client(settings.redis_url, queue.read_wait_s(settings))
        try:
            with sessions.begin() as session:
                ledger.sync_models(session, settings)
            app.state.settings = settings
            app.state.sessions = sessions
            app.state.redis = redis
            app.state.reads_redis = reads_redis
            yield
        finally:
            redis.close()
            reads_redis.close()
            engine.dispose()

    app = FastAPI(
        title="memedit",
        summary="Correct facts inside language models; every edit in a ledger.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.include_router(router)
    return app


# -- routes ---------------------------------------------------------------------------


@router.get("/healthz", tags=["health"], responses={503: {"description": "a backend is down"}})
def healthz(session: SessionDep, redis: RedisDep) -> JSONResponse:
    """``{"status": "ok"}`` when the ledger database and Redis both answer, else 503."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        redis.ping()
        checks["redis"] = "ok"
    except RedisError as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ok"})
    log.warning("health check failed: %s", checks)
    return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)


@router.get("/v1/models", tags=["models"])
def list_models(session: SessionDep, redis: RedisDep, settings: SettingsDep) -> list[ModelPublic]:
    """The configured models, their head version and what their worker is doing
    (``worker.state``: ``loading``, ``statistics`` with ``progress``, ``ready`` or
    ``no worker``)."""
    return [
        _model_public(m, head, _worker(redis, settings, m.name))
        for m, head in ledger.list_models(session)
    ]


@router.put("/v1/models/{model}/policy", responses=_ERRORS, tags=["models"])
def set_policy(
    model: str, body: PolicyUpdate, session: SessionDep, redis: RedisDep, settings: SettingsDep
) -> ModelPublic:
    """Replace the model's evaluation policy: suites run after every version whose
    number is a multiple of ``every_versions``, compared with ``thresholds``; a
    breach raises an alert and, with ``action: rollback``, queues a rollback to the
    last healthy version. Applies to versions committed from now on."""
    row = ledger.set_evaluation_policy(session, model, body.evaluations)
    head = ledger.head_version_number(session, row.id)
    public = _model_public(row, head, _worker(redis, settings, model))
    session.commit()
    return public


@router.post(
    "/v1/models/{model}/edits",
    status_code=http.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    tags=["edits"],
)
def create_edits(
    model: str,
    body: EditCreate,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
) -> EditJobCreated:
    """Queue one job applying ``requests`` with ``method`` (ROME: one version per
    request, in order; MEMIT: batches of at most the model's ``max_batch`` requests,
    one version each, possibly shared with other jobs' requests unless ``batching``
    is ``alone``). Poll ``/v1/jobs/{job_id}``."""
    job = ledger.create_edit_job(
        session,
        model,
        body.method,
        body.hparams,
        body.requests,
        max_requests=settings.max_requests_per_edit,
        batching=body.batching,
    )
    created = EditJobCreated(
        job_id=job.id, edit_ids=[e.id for e in job.edits], worker=_worker(redis, settings, model)
    )
    session.commit()  # the ledger row exists before the queue hears of it
    queue.enqueue_job(redis, settings, model, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


@router.get("/v1/models/{model}/edits", responses=_ERRORS, tags=["edits"])
def list_edits(
    model: str,
    session: SessionDep,
    status: Annotated[EditStatus | None, Query(description="only edits in this status")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> EditsPublic:
    """The model's edits, oldest first, ``limit`` per page."""
    page = ledger.list_edits(session, model, status=status, limit=limit, cursor=cursor)
    return EditsPublic(items=[_edit_public(e) for e in page.items], next_cursor=page.next_cursor)


@router.get("/v1/jobs/{job_id}", responses=_ERRORS, tags=["jobs"])
def get_job(job_id: str, session: SessionDep) -> JobPublic:
    """A job's status, progress (0..1), error and result (new versions, per-edit metrics)."""
    job, model_name = ledger.get_job(session, job_id)
    return _job_public(job, model_name)


@router.get("/v1/models/{model}/versions", responses=_ERRORS, tags=["versions"])
def list_versions(
    model: str, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> VersionsPublic:
    """The model's versions by ascending number (0 is the base weights)."""
    page = ledger.list_versions(session, model, limit=limit, cursor=cursor)
    return VersionsPublic(
        items=[_version_public(v) for v in page.items], next_cursor=page.next_cursor
    )


@router.post(
    "/v1/models/{model}/rollback",
    status_code=http.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    tags=["versions"],
)
def create_rollback(
    model: str,
    body: RollbackCreate,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
) -> JobCreated:
    """Queue a job appending a version whose weights equal ``to_version``'s."""
    job = ledger.create_rollback_job(session, model, body.to_version)
    job_id = job.id
    session.commit()
    queue.enqueue_job(redis, settings, model, job_id)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobCreated(job_id=job_id, worker=_worker(redis, settings, model))


@router.post(
    "/v1/models/{model}/evaluations",
    status_code=http.HTTP_202_ACCEPTED,
    responses=_ERRORS,
    tags=["evaluations"],
)
def create_evaluation(
    model: str,
    body: EvaluationCreate,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
) -> EvaluationJobCreated:
    """Queue a job running ``suite`` on ``version`` (default: the head now). The
    result is stored against that version; poll ``/v1/jobs/{job_id}`` or list the
    model's evaluations."""
    job, evaluation = ledger.create_evaluation_job(
        session, model, body.suite, body.version, body.params
    )
    created = EvaluationJobCreated(
        job_id=job.id,
        evaluation_id=evaluation.id,
        version=evaluation.version,
        worker=_worker(redis, settings, model),
    )
    session.commit()
    queue.enqueue_evaluation(redis, settings, model, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


@router.get("/v1/models/{model}/evaluations", responses=_ERRORS, tags=["evaluations"])
def list_evaluations(
    model: str,
    session: SessionDep,
    suite: Annotated[SuiteName | None, Query(description="only this suite")] = None,
    version: Annotated[int | None, Query(ge=0, description="only this version")] = None,
    details: Annotated[bool, Query(description="include each run's details")] = False,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> EvaluationsPublic:
    """The model's evaluations as a time series: by version, then in the order asked."""
    page = ledger.list_evaluations(
        session, model, suite, version=version, limit=limit, cursor=cursor
    )
    return EvaluationsPublic(
        items=[_evaluation_public(e, details) for e in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/v1/models/{model}/evaluations/{evaluation_id}", responses=_ERRORS, tags=["evaluations"]
)
def get_evaluation(model: str, evaluation_id: int, session: SessionDep) -> EvaluationPublic:
    """One evaluation with its details."""
    return _evaluation_public(ledger.get_evaluation(session, model, evaluation_id), True)


@router.get("/v1/models/{model}/alerts", responses=_ERRORS, tags=["evaluations"])
def list_alerts(
    model: str,
    session: SessionDep,
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
        items=[_evaluation_public(e, False) for e in page.items], next_cursor=page.next_cursor
    )


def _finite(x: float | None) -> float | None:
    """JSON has no inf/NaN: a non-finite headline number (a collapsed model's
    perplexity) is null here; ``measurements`` keeps it as the string "inf"/"nan"."""
    return x if x is not None and math.isfinite(x) else None


@router.get("/v1/models/{model}/guard-decisions", responses=_ERRORS, tags=["versions"])
def list_guard_decisions(
    model: str,
    session: SessionDep,
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
        items=[
            GuardDecisionPublic(
                id=d.id,
                job_id=d.job_id,
                version=number,
                parent_version=d.parent_number,
                method=d.method,
                accepted=d.accepted,
                reason=d.reason,
                rules=list(d.rules or []),
                edit_ids=list(d.edit_ids or []),
                update_norm=_finite(d.update_norm),
                norm_median=_finite(d.norm_median),
                norm_ratio=_finite(d.norm_ratio),
                perplexity_before=_finite(d.perplexity_before),
                perplexity_after=_finite(d.perplexity_after),
                recall_before=_finite(d.recall_before),
                recall_after=_finite(d.recall_after),
                measurements=d.measurements or {},
                seconds=d.seconds,
                created_at=d.created_at,
            )
            for d, number in page.items
        ],
        next_cursor=page.next_cursor,
    )


@router.post("/v1/models/{model}/score", responses=_SYNC_ERRORS, tags=["reads"])
def score(
    model: str,
    body: ScoreRequest,
    session: SessionDep,
    redis: ReadsRedisDep,
    settings: SettingsDep,
) -> ScoreResponse:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at head."""
    if len(body.targets) != len(body.prompts):
        raise InvalidInput(
            "targets",
            f"needs one target per prompt ({len(body.targets)} targets, "
            f"{len(body.prompts)} prompts)",
        )
    if len(body.prompts) > settings.max_prompts_per_score:
        raise InvalidInput(
            "prompts", f"at most {settings.max_prompts_per_score} prompts per request"
        )
    _release_after_lookup(session, model)
    kwargs = {"model": model, "prompts": body.prompts, "targets": body.targets}
    answer = queue.call_read(redis, settings, model, "score", kwargs)
    return ScoreResponse.model_validate(answer)


@router.post("/v1/models/{model}/generate", responses=_SYNC_ERRORS, tags=["reads"])
def generate(
    model: str,
    body: GenerateRequest,
    session: SessionDep,
    redis: ReadsRedisDep,
    settings: SettingsDep,
) -> GenerateResponse:
    """Greedy continuation of ``prompt`` by the head version."""
    max_new_tokens = body.max_new_tokens or min(DEFAULT_NEW_TOKENS, settings.max_new_tokens)
    if max_new_tokens > settings.max_new_tokens:
        raise InvalidInput("max_new_tokens", f"must be at most {settings.max_new_tokens}")
    _release_after_lookup(session, model)
    kwargs = {"model": model, "prompt": body.prompt, "max_new_tokens": max_new_tokens}
    answer = queue.call_read(redis, settings, model, "generate", kwargs)
    return GenerateResponse.model_validate(answer)


def _release_after_lookup(session: Session, model: str) -> None:
    """404 for an unknown model; then give the connection back before waiting on a worker."""
    ledger.get_model(session, model)
    session.close()


# -- ORM rows -> public schemas ---------------------------------------------------------


def _worker(redis: Redis, settings: Settings, model: str) -> WorkerPublic:
    state = presence.model_worker(redis, settings.queue_prefix, model)
    return WorkerPublic.model_validate(state.public())


def _model_public(m: Model, head: int | None, worker: WorkerPublic) -> ModelPublic:
    return ModelPublic(
        name=m.name,
        source=m.source,
        architecture=m.architecture,
        head_version=head,
        policy=dict(m.policy or {}),
        worker=worker,
    )


def _evaluation_public(e: Evaluation, details: bool) -> EvaluationPublic:
    return EvaluationPublic(
        id=e.id,
        job_id=e.job_id,
        suite=e.suite,
        version=e.version,
        params=dict(e.params or {}),
        status=e.status,
        metrics=e.metrics,
        details=e.details if details else None,
        error=e.error,
        policy=e.policy,
        passed=e.passed,
        alert=e.alert,
        timing=e.timing or {},
        created_at=e.created_at,
        started_at=e.started_at,
        finished_at=e.finished_at,
    )


def _edit_public(e: Edit) -> EditPublic:
    return EditPublic(
        id=e.id,
        job_id=e.job_id,
        method=e.method,
        prompt=e.prompt,
        subject=e.subject,
        target_new=e.target_new,
        target_true=e.target_true,
        paraphrase_prompts=list(e.paraphrase_prompts or []),
        neighborhood_prompts=list(e.neighborhood_prompts or []),
        status=e.status,
        version=e.version.number if e.version is not None else None,
        metrics=e.metrics,
        reason=e.reason,
        created_at=e.created_at,
    )


def _job_public(job: Job, model_name: str) -> JobPublic:
    return JobPublic(
        id=job.id,
        kind=job.kind,
        model=model_name,
        status=job.status,
        progress=min(1.0, max(0.0, job.progress or 0.0)),
        message=job.message,
        error=job.error,
        result=job.result,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _version_public(v: Version) -> VersionPublic:
    return VersionPublic(
        number=v.number,
        kind=v.kind,
        method=v.method,
        hparams=v.hparams,
        parent_number=v.parent_number,
        job_id=v.job_id,
        created_at=v.created_at,
        drift=v.drift or {},
        update_norm=v.update_norm,
        tensor_sha256=v.tensor_sha256 or {},
        timing=v.timing or {},
    )


# -- errors ---------------------------------------------------------------------------


def _error_response(
    status_code: int, items: list[ErrorItem], worker: WorkerPublic | None = None
) -> JSONResponse:
    first = items[0]
    detail = f"{first.field}: {first.message}" if first.field else first.message
    body = ErrorPublic(detail=detail, errors=items, worker=worker).model_dump(mode="json")
    if worker is None:
        del body["worker"]  # only the 503s of reads carry it
    return JSONResponse(body, status_code=status_code)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServiceError):  # pragma: no cover - registered for ServiceError
        raise exc
    if exc.status_code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    item = ErrorItem(field=exc.field, message=exc.message, type=exc.error_type)
    if isinstance(exc, WorkerUnavailable):
        response = _error_response(exc.status_code, [item], WorkerPublic.model_validate(exc.worker))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    return _error_response(exc.status_code, [item])


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover
        raise exc
    items = [_validation_item(err) for err in exc.errors()]
    return _error_response(http.HTTP_422_UNPROCESSABLE_CONTENT, items)


def _validation_item(err: dict[str, Any]) -> ErrorItem:
    """FastAPI's ``loc`` (``["body", "requests", 0, "prompt"]``) as ``requests.0.prompt``."""
    loc = [str(p) for p in err.get("loc", ())]
    if err.get("type") == "json_invalid":
        field = "body"  # loc holds the character offset of the syntax error
        message = f"is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    else:
        field = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "body")
        message = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    return ErrorItem(field=field, message=message, type=str(err.get("type", "invalid")))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
        raise exc
    item = ErrorItem(field=None, message=str(exc.detail), type="http_error")
    response = _error_response(exc.status_code, [item])
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: database error", request.method, request.url.path, exc_info=exc)
    item = ErrorItem(field=None, message="the ledger database did not answer", type="unavailable")
    return _error_response(http.HTTP_503_SERVICE_UNAVAILABLE, [item])


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: redis error", request.method, request.url.path, exc_info=exc)
    item = ErrorItem(field=None, message="the queue (Redis) did not answer", type="unavailable")
    return _error_response(http.HTTP_503_SERVICE_UNAVAILABLE, [item])
