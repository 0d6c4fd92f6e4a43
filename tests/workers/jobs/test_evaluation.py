"""Evaluation jobs end to end on a tiny model: HTTP API → ledger → Redis (the model's
eval queue) → SimpleWorker → runtime at the evaluated version → suite → ledger; and
the per-model policies (every N versions, thresholds, alert, rollback).

Everything is real (PostgreSQL, Redis, rq, ROME, the runtime, the suites); the tiny
LLaMA is saved to a folder and loaded from there by the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from service.settings import ModelSpec, Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES, tiny_model, word_tokenizer
from workers import startup
from workers.evaluation import counterfact
from workers.runtime import ModelRuntime
from workers.worker import WorkerState

pytestmark = pytest.mark.e2e

MODEL = "tiny"
SUBJECTS = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin"]
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo", "Moscow"]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def e2e_settings(
    model_settings: Callable[..., Settings], tiny_dir: Path, data_root: Path
) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), snapshot_every=3)
    return model_settings(MODEL, spec, data_root=data_root)


@pytest.fixture
def client(e2e_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(e2e_settings)


def _fact(i: int) -> tuple[str, str, str, str]:
    return ("{} was born in", SUBJECTS[i], CITIES[i], CITIES[(i + 1) % len(CITIES)])


def edit_body(indices: list[int]) -> dict[str, Any]:
    # C₀ off, as the ROME test of tests/workers/jobs/test_edit.py (no statistics needed)
    return {
        "method": "rome",
        "hparams": {**TINY_OVERRIDES["rome"], "mom2_adjustment": False},
        "requests": [
            {"prompt": p, "subject": s, "target_new": new, "target_true": true}
            for p, s, new, true in map(_fact, indices)
        ],
    }


def cf_record(i: int) -> dict[str, Any]:
    prompt, subject, new, true = _fact(i)
    return {
        "case_id": i,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new},
            "target_true": {"str": true},
        },
        "paraphrase_prompts": [f"{subject} lives in"],
        "neighborhood_prompts": [f"{SUBJECTS[(i + 3) % len(SUBJECTS)]} was born in"],
    }


def drain(settings: Settings, redis: Redis) -> None:
    harness.drain(MODEL, settings, redis)


def evaluations(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    resp = client.get(f"/v1/models/{MODEL}/evaluations", params={"limit": 100, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


def edit_statuses(client: TestClient) -> list[str]:
    items = client.get(f"/v1/models/{MODEL}/edits", params={"limit": 100}).json()["items"]
    return [e["status"] for e in items]


def test_evaluation_lifecycle_older_version_and_the_next_edit(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis, tiny_dir: Path
) -> None:
    state: WorkerState = harness.start_worker(MODEL, e2e_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body([0, 1, 2]))
    drain(e2e_settings, redis_conn)
    assert harness.job(client, r.json()["job_id"])["status"] == "succeeded"
    edits = client.get(f"/v1/models/{MODEL}/edits").json()["items"]
    assert [e["version"] for e in edits] == [1, 2, 3]

    params = {"records": [cf_record(i) for i in range(3)]}
    at_head = client.post(
        f"/v1/models/{MODEL}/evaluations", json={"suite": "counterfact", "params": params}
    )
    at_base = client.post(
        f"/v1/models/{MODEL}/evaluations",
        json={"suite": "counterfact", "version": 0, "params": params},
    )
    assert at_head.status_code == at_base.status_code == 202, at_head.text
    assert at_head.json()["version"] == 3 and at_base.json()["version"] == 0
    queued = harness.job(client, at_head.json()["job_id"])
    assert queued["kind"] == "evaluation" and queued["status"] == "queued"
    assert evaluations(client)[0]["status"] == "queued"

    drain(e2e_settings, redis_conn)
    for created in (at_head, at_base):
        done = harness.job(client, created.json()["job_id"])
        assert done["status"] == "succeeded", done
        assert done["progress"] == 1.0 and done["started_at"] <= done["finished_at"]
        assert done["result"]["evaluation_id"] == created.json()["evaluation_id"]
    assert state.runtime.current_version == 0  # left at the last version evaluated

    series = evaluations(client, suite="counterfact")
    assert [e["version"] for e in series] == [0, 3]
    assert all(e["status"] == "succeeded" and e["timing"]["total_s"] > 0 for e in series)
    base_m, head_m = series[0]["metrics"], series[1]["metrics"]
    # version 0 scores what the unedited model scores, exactly
    fresh = tiny_model("llama", seed=0)
    assert base_m == counterfact.run_suite(fresh, word_tokenizer(), params)["metrics"]
    assert head_m != base_m
    # per record, the scores agree with what the edit jobs measured on the same
    # weights: before the first edit (version 0), and right after the last (version 3)
    rows = {
        e["version"]: client.get(f"/v1/models/{MODEL}/evaluations/{e['id']}").json()["details"][
            "records"
        ]
        for e in series
    }
    assert [r["case_id"] for r in rows[3]] == [0, 1, 2]
    assert rows[0][0]["efficacy"] == edits[0]["metrics"]["pre_efficacy"]
    assert rows[3][2]["efficacy"] == edits[2]["metrics"]["efficacy"]
    assert rows[3][2]["efficacy_diff"] == pytest.approx(edits[2]["metrics"]["efficacy_diff"])
    assert rows[0][0]["efficacy_diff"] == pytest.approx(edits[0]["metrics"]["pre_efficacy_diff"])

    # the next edit syncs back to the head (3) before applying: version 4 builds on 3
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body([3]))
    drain(e2e_settings, redis_conn)
    assert harness.job(client, r.json()["job_id"])["result"]["versions"] == [4]
    vs = harness.all_versions(client, MODEL)
    assert vs[4]["parent_number"] == 3
    assert state.runtime.current_version == 4
    # a fresh worker replays the ledger to the same bytes
    again = harness.start_worker(MODEL, e2e_settings)
    edited = sorted(vs[4]["tensor_sha256"])
    assert again.runtime.tensor_hashes(edited) == vs[4]["tensor_sha256"]
    assert state.runtime.tensor_hashes(edited) == vs[4]["tensor_sha256"]

    # and the edits of the chain up to a version are what retention re-scores
    ret = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention", "version": 2})
    drain(e2e_settings, redis_conn)
    row = client.get(f"/v1/models/{MODEL}/evaluations/{ret.json()['evaluation_id']}").json()
    assert row["status"] == "succeeded", row
    assert row["metrics"]["count"] == 2.0
    assert [e["edit_id"] for e in row["details"]["edits"]] == [1, 2]


def test_policy_every_n_versions_breach_rolls_back_to_the_last_healthy_version(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    policy = [
        # count = edits on the version's chain: deterministic, so the breach is known
        {
            "name": "forgetting",
            "suite": "retention",
            "every_versions": 2,
            "thresholds": {"count": {"max": 3}},
            "action": "rollback",
        },
        {"name": "watch", "suite": "retention", "every_versions": 3},
    ]
    assert client.put(f"/v1/models/{MODEL}/policy", json={"evaluations": policy}).status_code == 200
    harness.start_worker(MODEL, e2e_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body([0, 1, 2, 3]))
    drain(e2e_settings, redis_conn)
    assert harness.job(client, r.json()["job_id"])["result"]["versions"] == [1, 2, 3, 4]

    series = evaluations(client)
    assert [(e["version"], e["policy"], e["status"]) for e in series] == [
        (2, "forgetting", "succeeded"),
        (3, "watch", "succeeded"),
        (4, "forgetting", "succeeded"),
    ]
    assert [e["metrics"]["count"] for e in series] == [2.0, 3.0, 4.0]
    assert [e["passed"] for e in series] == [True, None, False]
    assert series[0]["alert"] is None and series[1]["alert"] is None
    alert = series[2]["alert"]
    assert alert["breaches"] == [{"metric": "count", "value": 4.0, "max": 3.0}]
    assert alert["action"] == "rollback"
    assert alert["rollback"]["to_version"] == 2  # the last version whose run passed
    rollback = harness.job(client, alert["rollback"]["job_id"])
    assert rollback["kind"] == "rollback" and rollback["status"] == "succeeded", rollback
    assert rollback["result"]["to_version"] == 2 and rollback["result"]["versions"] == [5]
    assert edit_statuses(client) == ["applied", "applied", "reverted", "reverted"]
    assert [a["id"] for a in client.get(f"/v1/models/{MODEL}/alerts").json()["items"]] == [
        series[2]["id"]
    ]
    # version 5 is due for no policy (5 is no multiple of 2 or 3): nothing more ran
    assert len(evaluations(client)) == 3


def test_alert_only_policy_and_no_rollback_once_the_version_is_undone(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    policy = [
        {
            "name": "guard",
            "suite": "retention",
            "every_versions": 1,
            "thresholds": {"count": {"max": 1}},
            "action": "rollback",
        },
        {
            "name": "notify",
            "suite": "retention",
            "every_versions": 2,
            "thresholds": {"count": {"max": 0}, "perplexity": {"max": 9}},
        },
    ]
    client.put(f"/v1/models/{MODEL}/policy", json={"evaluations": policy})
    harness.start_worker(MODEL, e2e_settings)
    edits = client.post(f"/v1/models/{MODEL}/edits", json=edit_body([0, 1]))
    # someone rolls back to the base before the evaluations run (edits go first)
    manual = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0})
    drain(e2e_settings, redis_conn)
    assert harness.job(client, edits.json()["job_id"])["result"]["versions"] == [1, 2]
    assert harness.job(client, manual.json()["job_id"])["result"]["versions"] == [3]

    series = evaluations(client)
    got = [(e["version"], e["policy"], e["metrics"]["count"], e["passed"]) for e in series]
    assert got == [
        (1, "guard", 1.0, True),
        (2, "guard", 2.0, False),
        (2, "notify", 2.0, False),
        (3, "guard", 0.0, True),  # the rollback to 0 holds no edits
    ]
    guard_alert = series[1]["alert"]
    assert guard_alert["rollback"] is None
    assert "no longer in effect" in guard_alert["rollback_skipped"]
    notify_alert = series[2]["alert"]
    assert notify_alert["action"] == "alert" and "rollback" not in notify_alert
    assert notify_alert["breaches"] == [{"metric": "count", "value": 2.0, "max": 0.0}]
    assert notify_alert["missing"] == ["perplexity"]
    alerts = client.get(f"/v1/models/{MODEL}/alerts").json()["items"]
    assert [a["id"] for a in alerts] == [series[1]["id"], series[2]["id"]]
    assert len(harness.all_versions(client, MODEL)) == 4  # no rollback was queued


def test_data_paths_are_resolved_inside_the_worker_data_root(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis, data_root: Path, tmp_path: Path
) -> None:
    lines = "".join(json.dumps(cf_record(i)) + "\n" for i in range(4))
    (data_root / "cf.jsonl").write_text(lines)
    outside = tmp_path / "outside.jsonl"
    outside.write_text(lines)
    state = harness.start_worker(MODEL, e2e_settings)

    inside = client.post(
        f"/v1/models/{MODEL}/evaluations",
        json={"suite": "counterfact", "params": {"data_path": "cf.jsonl", "limit": 2}},
    )
    escaped = client.post(
        f"/v1/models/{MODEL}/evaluations",
        json={"suite": "counterfact", "params": {"data_path": str(outside)}},
    )
    assert inside.status_code == escaped.status_code == 202
    # a relative path climbing out is refused by the API already
    climbing = client.post(
        f"/v1/models/{MODEL}/evaluations",
        json={"suite": "counterfact", "params": {"data_path": "../outside.jsonl"}},
    )
    assert (
        climbing.status_code == 422 and climbing.json()["errors"][0]["field"] == "params.data_path"
    )

    drain(e2e_settings, redis_conn)
    ok = harness.job(client, inside.json()["job_id"])
    assert ok["status"] == "succeeded", ok
    assert ok["result"]["metrics"]["count"] == 2.0
    bad = harness.job(client, escaped.json()["job_id"])
    assert bad["status"] == "failed"
    assert "outside the worker's data root" in bad["error"]
    row = client.get(f"/v1/models/{MODEL}/evaluations/{escaped.json()['evaluation_id']}").json()
    assert row["status"] == "failed" and "outside" in row["error"] and row["metrics"] is None
    assert isinstance(state.runtime, ModelRuntime) and state.runtime.current_version == 0


def test_a_lost_evaluation_is_requeued_on_the_eval_queue_from_the_ledger(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    state = harness.start_worker(MODEL, e2e_settings)
    created = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"})
    assert created.status_code == 202
    redis_conn.flushdb()  # Redis lost the message; the ledger still has the job
    edits = Queue(e2e_settings.edit_queue(MODEL), connection=redis_conn)
    assert startup.requeue_unfinished(state, edits) == 1
    evals = Queue(e2e_settings.eval_queue(MODEL), connection=redis_conn)
    assert evals.job_ids == [created.json()["job_id"]] and edits.job_ids == []
    drain(e2e_settings, redis_conn)
    done = harness.job(client, created.json()["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["metrics"] == {"retention": 1.0, "count": 0.0}
