"""GET /healthz (service/api/routes/health.py) against the real ledger and Redis."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import sessionmaker

from service.api import create_app
from service.presence import Phase
from service.settings import Settings
from tests.service.conftest import MODEL, NO_WORKER, OTHER, announce


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


def test_a_ledger_outage_is_503_with_retry_after_and_healthz_names_it(
    client: TestClient,
) -> None:
    """The database goes away under a running API (its sessions now reach nothing)."""
    dead = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none",
                         connect_args={"connect_timeout": 2})  # fmt: skip
    client.app.state.sessions = sessionmaker(bind=dead)  # type: ignore[attr-defined]
    resp = client.get(f"/v1/models/{MODEL}/edits")
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "5"
    assert resp.json()["detail"] == "the ledger database did not answer"
    health = client.get("/healthz")
    assert health.status_code == 503 and health.headers["Retry-After"] == "5"
    assert health.json()["checks"] == {"database": "error: OperationalError", "redis": "ok"}


def test_healthz_workers_names_each_models_worker(
    client: TestClient, api_settings: Settings
) -> None:
    announce(api_settings, MODEL, Phase.statistics, progress=0.4, message="statistics: 2/5")
    got = client.get("/healthz/workers").json()
    assert set(got) == set(api_settings.models)
    assert got[MODEL]["state"] == "statistics" and got[MODEL]["progress"] == 0.4
    assert got[OTHER] == NO_WORKER
