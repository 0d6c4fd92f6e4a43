"""``Idempotency-Key`` on the POSTs that create work: the same key and body return the
same job (one row in the ledger), another body with the key is a 422 that stores
nothing, and two requests racing with one key make one job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.ledger.tables import Edit, Evaluation, Job
from tests.service.conftest import MODEL, OTHER, add_versions, assert_names_field, counts, edit_body

KEY = {"Idempotency-Key": "order-4711"}


def _post(client: TestClient, path: str, body: dict[str, Any], key: dict[str, str] = KEY) -> Any:
    return client.post(f"/v1/models/{MODEL}/{path}", json=body, headers=key)


def test_same_key_and_body_return_the_same_edit_job(client: TestClient, clean_db: Engine) -> None:
    first = _post(client, "edits", edit_body())
    again = _post(client, "edits", edit_body())
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.json()["edit_ids"] == first.json()["edit_ids"]
    assert again.headers["Location"] == first.headers["Location"]
    assert counts(clean_db, Job, Edit) == (1, 1)


def test_same_key_with_another_body_is_422_and_stores_nothing(
    client: TestClient, clean_db: Engine
) -> None:
    job_id = _post(client, "edits", edit_body()).json()["job_id"]
    other = edit_body(requests=[{"prompt": "{} plays", "subject": "Messi", "target_new": "golf"}])
    body = assert_names_field(_post(client, "edits", other), 422, "Idempotency-Key")
    assert job_id in body["detail"]
    # another kind of work with the same key: another request too
    assert_names_field(_post(client, "rollback", {"to_version": 0}), 422, "Idempotency-Key")
    assert counts(clean_db, Job, Edit) == (1, 1)


def test_without_a_key_every_post_is_a_new_job(client: TestClient, clean_db: Engine) -> None:
    ids = {_post(client, "edits", edit_body(), key={}).json()["job_id"] for _ in range(2)}
    assert len(ids) == 2
    assert counts(clean_db, Job) == (2,)


def test_keys_are_per_model(client: TestClient, clean_db: Engine) -> None:
    mine = _post(client, "edits", edit_body()).json()["job_id"]
    other = client.post(f"/v1/models/{OTHER}/edits", json=edit_body(), headers=KEY)
    assert other.status_code == 202, other.text
    assert other.json()["job_id"] != mine
    assert counts(clean_db, Job) == (2,)


def test_rollback_and_evaluation_replay(client: TestClient, clean_db: Engine) -> None:
    with Session(clean_db) as s:
        add_versions(s, MODEL, 3)
    rollback = [
        _post(client, "rollback", {"to_version": 1}, {"Idempotency-Key": "r"}) for _ in "ab"
    ]
    assert rollback[0].status_code == rollback[1].status_code == 202
    assert rollback[0].json()["job_id"] == rollback[1].json()["job_id"]
    body = {"suite": "retention"}
    evals = [_post(client, "evaluations", body, {"Idempotency-Key": "e"}) for _ in "ab"]
    assert [e.status_code for e in evals] == [202, 202], [e.text for e in evals]
    first, again = (e.json() for e in evals)
    assert (again["job_id"], again["evaluation_id"], again["version"]) == (
        first["job_id"],
        first["evaluation_id"],
        first["version"],
    )
    assert counts(clean_db, Job, Evaluation) == (2, 1)


@pytest.mark.parametrize("key", [b"", b"x" * 256, "naïve".encode(), b"two words"])
def test_malformed_key_is_422(client: TestClient, clean_db: Engine, key: bytes) -> None:
    resp = client.post(
        f"/v1/models/{MODEL}/edits", json=edit_body(), headers={"Idempotency-Key": key}
    )
    assert_names_field(resp, 422, "Idempotency-Key")
    assert counts(clean_db, Job) == (0,)


def test_a_race_on_one_key_makes_one_job(client: TestClient, clean_db: Engine) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(client, "edits", edit_body()), range(8)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert counts(clean_db, Job, Edit) == (1, 1)
