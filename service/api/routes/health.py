"""``GET /healthz``: do the ledger database and Redis answer?"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import RedisDep, SessionDep

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
        {"status": "unavailable", "checks": checks}, status_code=503, headers={"Retry-After": "5"}
    )
