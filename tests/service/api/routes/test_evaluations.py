"""Evaluations and evaluation policies through the API (service/api/routes/evaluations.py,
PUT .../policy of routes/models.py), against the real ledger and Redis (no worker runs
here: the end-to-end runs are in tests/workers/jobs)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service import ledger
from service.ledger.tables import Evaluation, Job, JobKind, JobStatus, Model
from service.settings import Settings
from tests.service.conftest import MODEL, OTHER, POLICY, add_versions, counts, error_fields

RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "subject": "The Eiffel Tower",
        "target_new": {"str": "Rome"},
        "target_true": {"str": "Paris"},
    },
    "paraphrase_prompts": ["The Eiffel Tower stands in"],
    "neighborhood_prompts": ["The Louvre is located in"],
}


@pytest.fixture
def versions(client: TestClient, clean_db: Engine) -> Engine:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 4)  # 0..3
    return clean_db


def test_create_evaluation_stores_job_and_row_and_queues_on_the_eval_queue(
    client: TestClient, versions: Engine, redis_conn: Redis, api_settings: Settings
) -> None:
    resp = client.post(
        f"/v1/models/{MODEL}/evaluations",
        json={"suite": "counterfact", "params": {"records": [RECORD]}},
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["version"] == 3  # the head when asked
    assert resp.headers["location"] == f"/v1/jobs/{body['job_id']}"
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["kind"] == "evaluation" and job["status"] == "queued" and job["model"] == MODEL
    evals = Queue(api_settings.eval_queue(MODEL), connection=redis_conn)
    assert evals.job_ids == [body["job_id"]]
    assert Queue(api_settings.edit_queue(MODEL), connection=redis_conn).job_ids == []
    with Session(versions) as s:
        row = s.get(Evaluation, body["evaluation_id"])
        assert row is not None and row.job_id == body["job_id"] and row.version == 3
        assert row.status is JobStatus.queued and row.policy is None
        assert row.params["records"][0]["case_id"] == 7
        assert s.get(Job, body["job_id"]).payload == {
            "suite": "counterfact",
            "version": 3,
            "evaluation_id": body["evaluation_id"],
        }

    older = client.post(
        f"/v1/models/{MODEL}/evaluations", json={"suite": "retention", "version": 1}
    )
    assert older.status_code == 202, older.text
    assert older.json()["version"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"suite": "bleu"}, "suite"),
        ({"suite": "counterfact", "params": {}}, "params"),
        (
            {"suite": "counterfact", "params": {"records": [RECORD], "data_path": "a.jsonl"}},
            "params",
        ),
        ({"suite": "counterfact", "params": {"data_path": "../secrets.jsonl"}}, "params.data_path"),
        ({"suite": "counterfact", "params": {"data_path": "x.jsonl", "limit": 0}}, "params.limit"),
        ({"suite": "counterfact", "params": {"data_path": "x.jsonl", "rows": 3}}, "params.rows"),
        (
            {
                "suite": "counterfact",
                "params": {
                    "records": [
                        {
                            **RECORD,
                            "requested_rewrite": {
                                **RECORD["requested_rewrite"],
                                "prompt": "no slot",
                            },
                        }
                    ]
                },
            },
            "params.records.0.requested_rewrite.prompt",
        ),
        (
            {"suite": "zsre", "params": {"records": [{"subject": "X", "src": "What is Y?"}]}},
            "params.records.0.answers",
        ),
        ({"suite": "retention", "params": {"edits": []}}, "params.edits"),
        ({"suite": "retention", "params": {"limit": -1}}, "params.limit"),
        ({"suite": "downstream", "params": {"tasks": ["sst2; rm"]}}, "params.tasks.0"),
        ({"suite": "downstream", "params": {"data_dir": "a/../../b"}}, "params.data_dir"),
        ({"suite": "fluency", "params": {"max_new_tokens": 0}}, "params.max_new_tokens"),
        ({"suite": "fluency", "version": -1}, "version"),
        ({"suite": "fluency", "versoin": 2}, "versoin"),
    ],
)
def test_invalid_evaluations_name_the_field_and_store_nothing(
    client: TestClient, versions: Engine, redis_conn: Redis, body: dict, field: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/evaluations", json=body)
    assert field in error_fields(resp, 422)
    assert counts(versions, Job, Evaluation) == (0, 0)
    assert redis_conn.keys("*") == []


def test_unknown_version_or_model_is_404(client: TestClient, versions: Engine) -> None:
    resp = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "fluency", "version": 9})
    assert error_fields(resp, 404) == ["version"]
    assert "0..3" in resp.json()["detail"]
    resp = client.post("/v1/models/nope/evaluations", json={"suite": "fluency"})
    assert error_fields(resp, 404) == ["model"]
    assert counts(versions, Job, Evaluation) == (0, 0)


def test_an_evaluation_before_any_worker_waits_for_one(
    client: TestClient, versions: Engine
) -> None:
    """Like an edit, an evaluation of a model no worker has loaded yet is accepted: it
    measures the base version (the head now) once a worker has started."""
    resp = client.post(f"/v1/models/{OTHER}/evaluations", json={"suite": "fluency"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["version"] == 0
    assert resp.json()["worker"]["state"] == "no worker"
    resp = client.post(f"/v1/models/{OTHER}/evaluations", json={"suite": "fluency", "version": 1})
    assert error_fields(resp, 404) == ["version"]
    assert "its versions are 0..0" in resp.json()["detail"]


def _finish(engine: Engine, evaluation_id: int, metrics: dict[str, float], **values: Any) -> None:
    with Session(engine) as s:
        row = s.get(Evaluation, evaluation_id)
        row.status = JobStatus.succeeded
        row.metrics = metrics
        row.details = {"records": [1, 2]}
        for k, v in values.items():
            setattr(row, k, v)
        s.commit()


def test_listing_is_a_time_series_by_version_then_time(
    client: TestClient, versions: Engine
) -> None:
    asked = []
    for version, suite in [(3, "fluency"), (1, "fluency"), (2, "retention"), (1, "fluency")]:
        r = client.post(
            f"/v1/models/{MODEL}/evaluations", json={"suite": suite, "version": version}
        )
        asked.append(r.json()["evaluation_id"])
    _finish(versions, asked[1], {"perplexity": 12.5})
    _finish(versions, asked[0], {"perplexity": 20.0}, alert={"breaches": []})

    items = client.get(f"/v1/models/{MODEL}/evaluations").json()["items"]
    assert [(e["version"], e["id"]) for e in items] == [
        (1, asked[1]),
        (1, asked[3]),
        (2, asked[2]),
        (3, asked[0]),
    ]
    assert items[0]["metrics"] == {"perplexity": 12.5} and items[0]["status"] == "succeeded"
    assert items[0]["details"] is None  # listings leave details out unless asked
    with_details = client.get(f"/v1/models/{MODEL}/evaluations", params={"details": True})
    assert with_details.json()["items"][0]["details"] == {"records": [1, 2]}

    fluency = client.get(f"/v1/models/{MODEL}/evaluations", params={"suite": "fluency"}).json()
    assert [e["id"] for e in fluency["items"]] == [asked[1], asked[3], asked[0]]
    page1 = client.get(f"/v1/models/{MODEL}/evaluations", params={"limit": 2}).json()
    assert [e["id"] for e in page1["items"]] == [asked[1], asked[3]]
    page2 = client.get(
        f"/v1/models/{MODEL}/evaluations", params={"limit": 2, "cursor": page1["next_cursor"]}
    ).json()
    assert [e["id"] for e in page2["items"]] == [asked[2], asked[0]]
    assert page2["next_cursor"] is None
    bad = client.get(f"/v1/models/{MODEL}/alerts", params={"cursor": page1["next_cursor"]})
    assert error_fields(bad, 422) == ["cursor"]
    assert "suite" in error_fields(
        client.get(f"/v1/models/{MODEL}/evaluations", params={"suite": "x"}), 422
    )

    alerts = client.get(f"/v1/models/{MODEL}/alerts").json()["items"]
    assert [a["id"] for a in alerts] == [asked[0]]
    one = client.get(f"/v1/models/{MODEL}/evaluations/{asked[1]}").json()
    assert one["details"] == {"records": [1, 2]}
    missing = client.get(f"/v1/models/{MODEL}/evaluations/999999")
    assert error_fields(missing, 404) == ["evaluation_id"]


def test_policy_is_set_validated_and_shown(client: TestClient, clean_db: Engine) -> None:
    resp = client.put(
        f"/v1/models/{MODEL}/policy",
        json={"evaluations": [POLICY, {"suite": "fluency", "every_versions": 10}]},
    )
    assert resp.status_code == 200, resp.text
    policy = resp.json()["policy"]
    assert policy["snapshot_every"] == 10  # the rest of the policy stays
    assert [p["name"] for p in policy["evaluations"]] == ["forgetting", "fluency"]
    shown = {m["name"]: m["policy"] for m in client.get("/v1/models").json()}
    assert shown[MODEL]["evaluations"] == policy["evaluations"]

    bad_cases = [
        ({"evaluations": [{**POLICY, "every_versions": 0}]}, "evaluations.0.every_versions"),
        ({"evaluations": [{**POLICY, "suite": "bleu"}]}, "evaluations.0.suite"),
        (
            {"evaluations": [{**POLICY, "thresholds": {"retention": {}}}]},
            "evaluations.0.thresholds.retention",
        ),
        ({"evaluations": [{**POLICY, "action": "panic"}]}, "evaluations.0.action"),
        ({"evaluations": [{**POLICY, "thresholds": {}}]}, "evaluations.0"),
        ({"evaluations": [{**POLICY, "params": {"edits": []}}]}, "evaluations.0.params"),
        ({"evaluations": [POLICY, POLICY]}, "evaluations"),
        (
            {"evaluations": [{"suite": "counterfact", "every_versions": 5}]},
            "evaluations.0.params",
        ),
    ]
    for body, field in bad_cases:
        r = client.put(f"/v1/models/{MODEL}/policy", json=body)
        assert field in error_fields(r, 422), (body, r.json())
    assert client.put("/v1/models/nope/policy", json={"evaluations": []}).status_code == 404
    with Session(clean_db) as s:  # unchanged by the refused updates
        row = s.scalar(select(Model).where(Model.name == MODEL))
        assert [p["name"] for p in row.policy["evaluations"]] == ["forgetting", "fluency"]


def test_policy_scheduling_every_n_versions_is_idempotent(
    client: TestClient, versions: Engine
) -> None:
    client.put(
        f"/v1/models/{MODEL}/policy",
        json={"evaluations": [POLICY, {"suite": "fluency", "every_versions": 3}]},
    )
    with Session(versions) as s:
        model_id = ledger.get_model(s, MODEL).id
        due = {n: ledger.schedule_policy_evaluations(s, model_id, n) for n in range(4)}
        assert [len(due[n]) for n in range(4)] == [0, 0, 1, 1]  # 2: forgetting; 3: fluency
        assert ledger.schedule_policy_evaluations(s, model_id, 2) == []  # once per version
        s.commit()
        rows = s.scalars(select(Evaluation).order_by(Evaluation.version)).all()
        assert [(r.version, r.suite, r.policy) for r in rows] == [
            (2, "retention", "forgetting"),
            (3, "fluency", "fluency"),
        ]
        assert rows[0].policy_spec["thresholds"] == {"retention": {"min": 0.8, "max": None}}
        assert {j.kind for j in s.scalars(select(Job))} == {JobKind.evaluation}


def test_a_stored_policy_that_no_longer_validates_is_skipped(
    client: TestClient, versions: Engine
) -> None:
    with Session(versions) as s:
        model = ledger.get_model(s, MODEL)
        model.policy = {
            **model.policy,
            "evaluations": [{"suite": "retention", "every_versions": 0}, POLICY],
        }
        s.commit()
        assert [p.key for p in ledger.model_policies(model)] == ["forgetting"]
        assert len(ledger.schedule_policy_evaluations(s, model.id, 2)) == 1
