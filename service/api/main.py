"""The app: :func:`create_app`, its lifespan (database engine, model rows, Redis
clients) and the error handlers.

Routes (:mod:`service.api.routes`) validate input (pydantic schemas, then the
ledger's domain checks), write the ledger, and hand work to the workers through
:mod:`service.queue`. Domain errors map to HTTP statuses here, in one place
(:func:`_service_error`); every error body has the same shape
(:class:`~service.schemas.ErrorPublic`) and names the field. The API imports
neither torch nor :mod:`workers` (a test checks it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi import status as http
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import VERSION, ledger, metrics, queue
from service.api.deps import BACKEND_RETRY_AFTER_S
from service.api.limits import BodyLimit
from service.api.routes import ROUTERS
from service.errors import ServiceError, WorkerUnavailable
from service.ledger.sessions import create_ledger_engine, session_factory
from service.redis_clients import blocking_client, command_client
from service.schemas import ErrorItem, ErrorPublic, WorkerPublic
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


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
        engine = create_ledger_engine(settings.database_url)
        sessions = session_factory(engine)
        redis = command_client(settings.redis_url)
        reads_redis = blocking_client(settings.redis_url, queue.read_wait_s(settings))
        try:
            with sessions.begin() as session:
                ledger.sync_models(session, settings)
            app.state.settings = settings
            app.state.sessions = sessions
            app.state.redis = redis
            app.state.reads_redis = reads_redis
            app.state.metrics = metrics.registry_for(sessions, redis, settings)
            yield
        finally:
            redis.close()
            reads_redis.close()
            engine.dispose()

    app = FastAPI(
        title="memedit",
        summary="Correct facts inside language models; every edit in a ledger.",
        version=VERSION,
        lifespan=lifespan,
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(RedisError, _redis_error)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


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
    worker = WorkerPublic.model_validate(exc.worker) if isinstance(exc, WorkerUnavailable) else None
    response = _error_response(exc.status_code, [item], worker)
    response.headers.update(exc.headers())
    return response


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
    if exc.status_code == http.HTTP_400_BAD_REQUEST and exc.__cause__ is not None:
        # FastAPI could not read the body (not UTF-8, NUL bytes): invalid input like
        # any malformed JSON, so 422 naming the body, as documented
        cause = exc.__cause__
        message = f"is not valid JSON ({type(cause).__name__}: {cause})"[:300]
        return _error_response(
            http.HTTP_422_UNPROCESSABLE_CONTENT,
            [ErrorItem(field="body", message=message, type="json_invalid")],
        )
    item = ErrorItem(field=None, message=str(exc.detail), type="http_error")
    response = _error_response(exc.status_code, [item])
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DataError):
        # a value the schemas let through but a column cannot hold: the input's fault
        log.warning("%s %s: value refused by the ledger: %s", request.method,
                    request.url.path, exc.orig)  # fmt: skip
        message = "a value is out of the range the ledger stores"
        return _error_response(
            http.HTTP_422_UNPROCESSABLE_CONTENT,
            [ErrorItem(field=None, message=message, type="out_of_range")],
        )
    log.error("%s %s: database error", request.method, request.url.path, exc_info=exc)
    item = ErrorItem(field=None, message="the ledger database did not answer", type="unavailable")
    response = _error_response(http.HTTP_503_SERVICE_UNAVAILABLE, [item])
    response.headers["Retry-After"] = str(BACKEND_RETRY_AFTER_S)
    return response


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: redis error", request.method, request.url.path, exc_info=exc)
    item = ErrorItem(field=None, message="the queue (Redis) did not answer", type="unavailable")
    response = _error_response(http.HTTP_503_SERVICE_UNAVAILABLE, [item])
    response.headers["Retry-After"] = str(BACKEND_RETRY_AFTER_S)
    return response
