"""GET /healthz (service/api/routes/health.py) against the real ledger and Redis."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine

from service.api import create_app
from service.settings import Settings


def test_healthz(client: TestClient) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_healthz_reports_a_dead_redis(
    api_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    broken = api_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        resp = c.get("/healthz")
    assert resp.status_code == 503
    assert resp.json()["checks"] == {"database": "ok", "redis": "error: ConnectionError"}
