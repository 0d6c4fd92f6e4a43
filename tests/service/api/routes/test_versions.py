"""GET /v1/models/{model}/versions and POST .../rollback (service/api/routes/versions.py) against the real ledger and Redis (no worker runs here)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job as RqJob
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.ledger.tables import Edit, Job
from service.settings import Settings
from tests.service.conftest import (
    MODEL,
    NO_WORKER,
    OTHER,
    add_versions,
    assert_names_field,
    counts,
)


def test_versions_listing(client: TestClient, clean_db: Engine) -> None:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 5)
    first = client.get(f"/v1/models/{MODEL}/versions", params={"limit": 3}).json()
    assert [v["number"] for v in first["items"]] == [0, 1, 2]
    rest = client.get(
        f"/v1/models/{MODEL}/versions", params={"limit": 3, "cursor": first["next_cursor"]}
    ).json()
    assert [v["number"] for v in rest["items"]] == [3, 4]
    assert rest["next_cursor"] is None
    base, v1 = first["items"][0], first["items"][1]
    assert (base["kind"], base["method"], base["parent_number"]) == ("base", None, None)
    assert v1 == {
        **v1,
        "kind": "edit",
        "method": "rome",
        "parent_number": 0,
        "drift": {"model.layers.4.mlp.down_proj.weight": 0.01},
        "update_norm": 1.0,
        "tensor_sha256": {"w": f"{1:064x}"},
        "timing": {"compute_s": 1.5},
        "job_id": None,
    }
    # a model no worker has loaded yet has its base version, without tensor hashes
    (other_base,) = client.get(f"/v1/models/{OTHER}/versions").json()["items"]
    assert (other_base["number"], other_base["kind"]) == (0, "base")
    assert other_base["tensor_sha256"] == {}


def test_rollback_to_existing_version_is_queued(
    client: TestClient, clean_db: Engine, redis_conn: Redis, api_settings: Settings
) -> None:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 3)
    resp = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.json() == {"job_id": job_id, "worker": NO_WORKER}
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["kind"], job["status"]) == ("rollback", "queued")
    queue = Queue(api_settings.edit_queue(MODEL), connection=redis_conn)
    assert queue.job_ids == [job_id]
    assert RqJob.fetch(job_id, connection=redis_conn).args == (job_id,)


@pytest.mark.parametrize(
    "body", [{"to_version": 3}, {"to_version": 99}, {"to_version": -1}, {"to_version": "x"}, {}]
)
def test_rollback_to_missing_version_is_422_naming_to_version(
    client: TestClient, clean_db: Engine, redis_conn: Redis, body: dict[str, Any]
) -> None:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 3)
    assert_names_field(client.post(f"/v1/models/{MODEL}/rollback", json=body), 422, "to_version")
    assert counts(clean_db, Job, Edit) == (0, 0)
    assert redis_conn.keys("rq:job:*") == []


def test_rollback_of_unknown_model_is_404(client: TestClient) -> None:
    assert_names_field(
        client.post("/v1/models/nope/rollback", json={"to_version": 0}), 404, "model"
    )
