"""Open to every client, with or without an API key: ``GET /healthz`` (do the ledger
database and Redis answer?), ``GET /healthz/workers`` (what each configured
model's worker is doing: what ``memedit up`` polls while the worker starts, and what a
load balancer or an orchestrator's readiness probe needs) and ``GET /metrics``
(Prometheus, :mod:`service.metrics`)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.api.deps import (
    BACKEND_RETRY_AFTER_S,
    RedisDep,
    SessionDep,
    SettingsDep,
    worker_of,
)
from service.schemas import WorkerPublic

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "a backend is down"}})
def healthz(session: SessionDep, redis: RedisDep) -> JSONResponse:
    """``{"status": "ok"}`` when the ledger database and Redis both answer, else 503
    with ``checks`` naming the one that is down and ``Retry-After``."""
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
    return JSONResponse(
        {"status": "unavailable", "checks": checks},
        status_code=503,
        headers={"Retry-After": str(BACKEND_RETRY_AFTER_S)},
    )


@router.get("/healthz/workers")
def healthz_workers(redis: RedisDep, settings: SettingsDep) -> dict[str, WorkerPublic]:
    """Each configured model's worker state (``state``: ``loading``, ``statistics`` with
    ``progress``, ``ready``, ``no worker``, or ``unknown`` when Redis does not answer;
    ``message`` says whether it is the writer or a replica). Needs no key."""
    return {name: worker_of(redis, settings, name) for name in sorted(settings.models)}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics (the text exposition format), read from the ledger and Redis
    at each scrape; docs/operations.md lists them. Needs no key."""
    body = metrics.exposition(request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
