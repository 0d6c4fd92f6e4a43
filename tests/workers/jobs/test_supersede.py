"""Supersede through the service on the tiny LLaMA (docs/editing.md, "Supersede"):
an edit of a subject and prompt that an applied edit has replaces it; the old edit
is ``superseded`` (``superseded_by``), its target pushed back under its value
before it, retention counts the fact once, and rollbacks move the statuses with the
chain. With ``supersede: never`` both edits stay applied."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL = "tiny"
PROMPT, SUBJECT, TRUE = "The native language of {}", "Picasso", "Spanish"


def _settings(model_settings: Callable[..., Settings], tiny_dir: Path, policy: str) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), guard=GuardPolicy(enabled=False), supersede=policy)
    return model_settings(MODEL, spec, sync_timeout_s=60.0)


def _edit(client: TestClient, settings: Settings, redis: Redis, target: str) -> dict[str, Any]:
    body = {"method": "rome", "hparams": {**TINY_OVERRIDES["rome"], "mom2_adjustment": False},
            "requests": [{"prompt": PROMPT, "subject": SUBJECT, "target_new": target,
                          "target_true": TRUE}]}  # fmt: skip
    r = client.post(f"/v1/models/{MODEL}/edits", json=body)
    assert r.status_code == 202, r.text
    harness.drain(MODEL, settings, redis)
    done = harness.job(client, r.json()["job_id"])
    assert done["status"] == "succeeded", done
    return done


def _edits(client: TestClient) -> list[tuple[int, str, int | None]]:
    items = client.get(f"/v1/models/{MODEL}/edits").json()["items"]
    return [(e["id"], e["status"], e["superseded_by"]) for e in items]


def _score(client: TestClient, settings: Settings, redis: Redis, targets: list[str]) -> list[float]:
    text = PROMPT.format(SUBJECT)
    body = {"prompts": [text] * len(targets), "targets": targets}
    r = harness.while_draining(MODEL, settings, redis,
                               lambda: client.post(f"/v1/models/{MODEL}/score", json=body))  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["logprobs"]


def _retention(client: TestClient, settings: Settings, redis: Redis) -> dict[str, Any]:
    r = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"})
    harness.drain(MODEL, settings, redis)
    return client.get(f"/v1/models/{MODEL}/evaluations/{r.json()['evaluation_id']}").json()


def test_a_second_edit_of_a_fact_supersedes_the_first(
    model_settings: Callable[..., Settings],
    tiny_dir: Path,
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
) -> None:
    settings = _settings(model_settings, tiny_dir, "auto")
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    (unedited_a,) = _score(client, settings, redis_conn, ["Russian"])
    _edit(client, settings, redis_conn, "Russian")
    done = _edit(client, settings, redis_conn, "Athens")
    assert _edits(client) == [(1, "superseded", 2), (2, "applied", None)]
    (metrics,) = done["result"]["metrics"].values()
    assert metrics["supersedes"] == 1
    assert metrics["suppressed"] == [["Russian", pytest.approx(unedited_a, abs=1e-4)]]
    new, old, true = _score(client, settings, redis_conn, ["Athens", "Russian", TRUE])
    assert new > max(old, true)
    assert old <= unedited_a  # back under its value before the first edit
    ret = _retention(client, settings, redis_conn)
    assert ret["metrics"]["count"] == 1.0
    assert [e["edit_id"] for e in ret["details"]["edits"]] == [2]

    # a rollback to version 1 brings the first edit back; forward again, the second
    for target, statuses in ((1, [(1, "applied", 2), (2, "reverted", None)]),
                             (2, [(1, "superseded", 2), (2, "applied", None)]),
                             (0, [(1, "reverted", 2), (2, "reverted", None)])):  # fmt: skip
        r = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": target})
        harness.drain(MODEL, settings, redis_conn)
        assert harness.job(client, r.json()["job_id"])["status"] == "succeeded"
        assert _edits(client) == statuses, target


def test_with_supersede_never_both_edits_stay_applied(
    model_settings: Callable[..., Settings],
    tiny_dir: Path,
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
) -> None:
    settings = _settings(model_settings, tiny_dir, "never")
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    _edit(client, settings, redis_conn, "Russian")
    done = _edit(client, settings, redis_conn, "Athens")
    assert _edits(client) == [(1, "applied", None), (2, "applied", None)]
    (metrics,) = done["result"]["metrics"].values()
    assert "supersedes" not in metrics
    assert _retention(client, settings, redis_conn)["metrics"]["count"] == 2.0
