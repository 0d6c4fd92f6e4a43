"""POST and GET /v1/models/{model}/edits (service/api/routes/edits.py) against the real ledger and Redis (no worker runs here)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job as RqJob
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from service.api import create_app
from service.ledger.tables import Edit, EditStatus, Job, JobStatus, Version
from service.settings import Settings
from tests.conftest import LOOPBACK
from tests.service.conftest import (
    MODEL,
    OTHER,
    add_versions,
    assert_names_field,
    counts,
    edit_body,
    edit_request,
)


def test_batching_alone_is_stored_in_the_payload(client: TestClient, clean_db: Engine) -> None:
    resp = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(batching="alone"))
    assert resp.status_code == 202, resp.text
    with Session(clean_db) as s:
        job = s.get(Job, resp.json()["job_id"])
        assert job is not None and job.payload["batching"] == "alone"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["EditCreate"]
    assert schema["properties"]["batching"]["enum"] == ["auto", "alone"]
    assert schema["properties"]["batching"]["default"] == "auto"


def test_create_edit_stores_rows_and_enqueues_the_ledger_job(
    client: TestClient, clean_db: Engine, redis_conn: Redis, api_settings: Settings
) -> None:
    body = edit_body(
        method="memit",
        requests=[edit_request(), edit_request(subject="Big Ben", target_true=None)],
        hparams={"v_num_grad_steps": 5},
    )
    resp = client.post(f"/v1/models/{MODEL}/edits", json=body)
    assert resp.status_code == 202, resp.text
    out = resp.json()
    job_id = out["job_id"]
    assert resp.headers["location"] == f"/v1/jobs/{job_id}"
    assert len(out["edit_ids"]) == 2

    with Session(clean_db) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status is JobStatus.queued
        assert job.payload == {
            "method": "memit",
            "hparams": {"v_num_grad_steps": 5},
            "batching": "auto",
        }
        edits = s.scalars(select(Edit).order_by(Edit.position)).all()
    assert [e.id for e in edits] == out["edit_ids"]
    assert [e.subject for e in edits] == ["The Eiffel Tower", "Big Ben"]
    assert edits[1].target_true is None

    queue = Queue(api_settings.edit_queue(MODEL), connection=redis_conn)
    assert queue.name == f"memedit:edits:{MODEL}"
    assert queue.job_ids == [job_id]
    rq_job = RqJob.fetch(job_id, connection=redis_conn)
    assert rq_job.func_name == "workers.jobs.run_job"
    assert rq_job.args == (job_id,)
    assert rq_job.timeout == api_settings.job_timeout_s
    other = Queue(api_settings.edit_queue(OTHER), connection=redis_conn)
    assert other.count == 0


def test_whitespace_is_trimmed(client: TestClient, clean_db: Engine) -> None:
    req = edit_request(
        prompt="  {} is located in ", subject=" The Eiffel Tower ", target_new=" Rome"
    )
    assert (
        client.post(f"/v1/models/{MODEL}/edits", json=edit_body(requests=[req])).status_code == 202
    )
    with Session(clean_db) as s:
        edit = s.scalars(select(Edit)).one()
    assert (edit.prompt, edit.subject, edit.target_new) == (
        "{} is located in",
        "The Eiffel Tower",
        "Rome",
    )


def test_optional_request_fields_default_to_empty(client: TestClient) -> None:
    req = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}
    resp = client.post(
        f"/v1/models/{MODEL}/edits", json={"method": "rome", "requests": [req], "hparams": None}
    )
    assert resp.status_code == 202, resp.text
    job = client.get(f"/v1/jobs/{resp.json()['job_id']}").json()
    assert job["status"] == "queued"
    item = client.get(f"/v1/models/{MODEL}/edits").json()["items"][0]
    assert item["target_true"] is None
    assert item["paraphrase_prompts"] == [] and item["neighborhood_prompts"] == []


_INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "no placeholder",
        edit_body(requests=[edit_request(prompt="Paris is in")]),
        "requests.0.prompt",
    ),
    (
        "two placeholders",
        edit_body(requests=[edit_request(prompt="{} and {}")]),
        "requests.0.prompt",
    ),
    ("named field", edit_body(requests=[edit_request(prompt="{x} is in")]), "requests.0.prompt"),
    ("numbered field", edit_body(requests=[edit_request(prompt="{0} is in")]), "requests.0.prompt"),
    ("extra field", edit_body(requests=[edit_request(prompt="{} is in {y}")]), "requests.0.prompt"),
    (
        "unbalanced brace",
        edit_body(requests=[edit_request(prompt="{} is in {")]),
        "requests.0.prompt",
    ),
    ("only placeholder", edit_body(requests=[edit_request(prompt=" {} ")]), "requests.0.prompt"),
    ("prompt not str", edit_body(requests=[edit_request(prompt=7)]), "requests.0.prompt"),
    ("empty subject", edit_body(requests=[edit_request(subject="")]), "requests.0.subject"),
    ("blank subject", edit_body(requests=[edit_request(subject="   ")]), "requests.0.subject"),
    ("subject not str", edit_body(requests=[edit_request(subject=["a"])]), "requests.0.subject"),
    ("subject null", edit_body(requests=[edit_request(subject=None)]), "requests.0.subject"),
    ("empty target", edit_body(requests=[edit_request(target_new="")]), "requests.0.target_new"),
    ("blank target", edit_body(requests=[edit_request(target_new=" ")]), "requests.0.target_new"),
    ("empty true", edit_body(requests=[edit_request(target_true="")]), "requests.0.target_true"),
    (
        "missing target",
        edit_body(requests=[{"prompt": "{} is in", "subject": "X"}]),
        "requests.0.target_new",
    ),
    (
        "empty paraphrase",
        edit_body(requests=[edit_request(paraphrase_prompts=["ok", ""])]),
        "requests.0.paraphrase_prompts.1",
    ),
    (
        "templated paraphrase",
        edit_body(requests=[edit_request(paraphrase_prompts=["{} stands in"])]),
        "requests.0.paraphrase_prompts.0",
    ),
    (
        "neighborhood not list",
        edit_body(requests=[edit_request(neighborhood_prompts="The Louvre is in")]),
        "requests.0.neighborhood_prompts",
    ),
    (
        "neighborhood not str",
        edit_body(requests=[edit_request(neighborhood_prompts=[3])]),
        "requests.0.neighborhood_prompts.0",
    ),
    (
        "misspelt field",
        edit_body(requests=[edit_request(paraphrases=["x"])]),
        "requests.0.paraphrases",
    ),
    (
        "second request bad",
        edit_body(requests=[edit_request(), edit_request(prompt="x")]),
        "requests.1.prompt",
    ),
    ("unknown method", edit_body(method="grace-ful"), "method"),
    ("method missing", {"requests": [edit_request()]}, "method"),
    ("no requests", edit_body(requests=[]), "requests"),
    ("requests not list", edit_body(requests=edit_request()), "requests"),
    ("too many requests", edit_body(requests=[edit_request()] * 4), "requests"),
    ("unknown hparam", edit_body(hparams={"learning_rate": 1}), "hparams.learning_rate"),
    ("hparam type", edit_body(hparams={"v_num_grad_steps": "many"}), "hparams.v_num_grad_steps"),
    ("hparam range", edit_body(hparams={"v_lr": -1}), "hparams.v_lr"),
    (
        "hparam of other method",
        edit_body(hparams={"mom2_update_weight": 10}),
        "hparams.mom2_update_weight",
    ),
    ("hparams not object", edit_body(hparams=[1]), "hparams"),
    ("unknown top-level", edit_body(dry_run=True), "dry_run"),
    ("unknown batching", edit_body(batching="later"), "batching"),
    ("batching not str", edit_body(batching=True), "batching"),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in _INVALID], ids=[c[0] for c in _INVALID])
def test_invalid_edit_is_422_naming_the_field_and_stores_nothing(
    client: TestClient, clean_db: Engine, redis_conn: Redis, body: dict[str, Any], field: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/edits", json=body)
    assert_names_field(resp, 422, field)
    assert counts(clean_db, Job, Edit) == (0, 0)
    assert redis_conn.keys("rq:job:*") == []


@pytest.mark.parametrize(
    "raw",
    [b'{"method": "rome", "requests": [', b"not json", b"", b"[]", b'"rome"'],
    ids=["truncated", "garbage", "empty", "array", "string"],
)
def test_malformed_json_is_422_on_body(client: TestClient, clean_db: Engine, raw: bytes) -> None:
    resp = client.post(
        f"/v1/models/{MODEL}/edits", content=raw, headers={"content-type": "application/json"}
    )
    assert_names_field(resp, 422, "body")
    assert counts(clean_db, Job, Edit) == (0, 0)


def test_edit_for_unknown_model_is_404(client: TestClient, clean_db: Engine) -> None:
    resp = client.post("/v1/models/gpt-17/edits", json=edit_body())
    body = assert_names_field(resp, 404, "model")
    assert "gpt-17" in body["detail"]
    assert counts(clean_db, Job, Edit) == (0, 0)


def test_edits_listing_pages_with_cursor_round_trip(client: TestClient, clean_db: Engine) -> None:
    created: list[int] = []
    for i in range(5):
        req = edit_request(subject=f"Subject {i}")
        created += client.post(f"/v1/models/{MODEL}/edits", json=edit_body(requests=[req])).json()[
            "edit_ids"
        ]
    client.post(f"/v1/models/{OTHER}/edits", json=edit_body())
    seen: list[int] = []
    url = f"/v1/models/{MODEL}/edits?limit=2"
    cursor = None
    for _ in range(10):
        resp = client.get(url, params={"cursor": cursor} if cursor else None)
        assert resp.status_code == 200
        page = resp.json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created
    item = client.get(f"/v1/models/{MODEL}/edits?limit=1").json()["items"][0]
    assert set(item) >= {
        "id",
        "job_id",
        "method",
        "prompt",
        "subject",
        "target_new",
        "target_true",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "status",
        "version",
        "metrics",
        "reason",
        "created_at",
    }
    assert (item["status"], item["version"], item["metrics"]) == ("queued", None, None)


def test_edits_listing_shows_version_and_filters_status(
    client: TestClient, clean_db: Engine
) -> None:
    ids = client.post(
        f"/v1/models/{MODEL}/edits",
        json=edit_body(requests=[edit_request(), edit_request(subject="Big Ben")]),
    ).json()["edit_ids"]
    with Session(clean_db) as s:
        add_versions(s, MODEL, 2)
        v1 = s.scalars(select(Version).where(Version.number == 1)).one()
        applied = s.get(Edit, ids[0])
        assert applied is not None
        applied.status, applied.version_id = EditStatus.applied, v1.id
        applied.metrics = {"efficacy": 1.0, "pre_efficacy": 0.0}
        s.commit()
    items = client.get(f"/v1/models/{MODEL}/edits", params={"status": "applied"}).json()["items"]
    assert [(i["id"], i["version"], i["metrics"]["efficacy"]) for i in items] == [(ids[0], 1, 1.0)]
    queued = client.get(f"/v1/models/{MODEL}/edits", params={"status": "queued"}).json()["items"]
    assert [i["id"] for i in queued] == [ids[1]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 10_000}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
def test_bad_listing_query_is_422(client: TestClient, query: dict[str, Any], field: str) -> None:
    assert_names_field(client.get(f"/v1/models/{MODEL}/edits", params=query), 422, field)


def test_listings_of_unknown_model_are_404(client: TestClient) -> None:
    for what in ("edits", "versions"):
        assert_names_field(client.get(f"/v1/models/nope/{what}"), 404, "model")


def test_edit_while_redis_is_down_is_202_and_stays_queued_in_the_ledger(
    api_settings: Settings, clean_db: Engine
) -> None:
    """The ledger row is committed before enqueueing: the answer is 202 (a client
    that retried a 503 would edit the fact twice) and the writer's reconciler
    enqueues the job (tests/workers/test_reconciler.py)."""
    broken = api_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken), client=LOOPBACK) as c:
        resp = c.post(f"/v1/models/{MODEL}/edits", json=edit_body())
    assert resp.status_code == 202, resp.text
    assert resp.json()["worker"]["state"] == "unknown"
    with Session(clean_db) as s:
        job = s.scalars(select(Job)).one()
        assert job.status is JobStatus.queued
    assert resp.json()["job_id"] == job.id
    assert resp.headers["Location"] == f"/v1/jobs/{job.id}"
    assert counts(clean_db, Job, Edit) == (1, 1)
