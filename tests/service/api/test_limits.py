"""Bad input that the fuzzing of the OpenAPI spec found: bodies over the cap are 413
before they are parsed, integers out of the ledger's range and booleans are 422 (not
503, not version 0), and none of it stores anything."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.api.limits import BodyLimit
from service.ledger import keys as ledger_keys
from service.ledger.tables import Edit, Evaluation, Job
from service.schemas import MAX_INT
from service.settings import Settings
from tests.service.conftest import MODEL, assert_names_field, counts, edit_body, edit_request

CAP = 4096


@pytest.fixture
def capped(api_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(api_settings.model_copy(update={"max_body_bytes": CAP}))


def _big_body() -> dict[str, object]:
    req = edit_request(paraphrase_prompts=["The Eiffel Tower stands in the city of"] * 64)
    return edit_body(requests=[req] * 3)


def test_a_body_over_the_cap_is_413_before_parsing(capped: TestClient, clean_db: Engine) -> None:
    body = _big_body()
    assert len(json.dumps(body)) > CAP
    resp = capped.post(f"/v1/models/{MODEL}/edits", json=body)
    got = assert_names_field(resp, 413, "body")
    assert str(CAP) in got["detail"]
    assert counts(clean_db, Job, Edit) == (0, 0)
    # under the cap the same route works
    assert capped.post(f"/v1/models/{MODEL}/edits", json=edit_body()).status_code == 202


def test_a_chunked_body_over_the_cap_is_413(capped: TestClient, clean_db: Engine) -> None:
    data = json.dumps(_big_body()).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts the bytes
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    resp = capped.post(
        f"/v1/models/{MODEL}/edits", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_names_field(resp, 413, "body")
    assert counts(clean_db, Job, Edit) == (0, 0)


def test_the_cap_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "post":
                assert "413" in op["responses"], (method, path)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("rollback", {"to_version": False}, "to_version"),
        ("rollback", {"to_version": True}, "to_version"),
        ("rollback", {"to_version": "0"}, "to_version"),
        ("rollback", {"to_version": MAX_INT + 1}, "to_version"),
        ("rollback", {"to_version": 2**63}, "to_version"),
        ("evaluations", {"suite": "retention", "version": False}, "version"),
        ("evaluations", {"suite": "retention", "version": MAX_INT + 1}, "version"),
        ("generate", {"prompt": "Hi", "max_new_tokens": True}, "max_new_tokens"),
        ("evaluations", {"suite": "retention", "params": {"limit": True}}, "params.limit"),
        ("evaluations", {"suite": "downstream", "params": {"shots": "3"}}, "params.shots"),
    ],
)
def test_integers_out_of_range_and_booleans_are_422(
    client: TestClient, clean_db: Engine, path: str, body: dict[str, object], field: str
) -> None:
    assert_names_field(client.post(f"/v1/models/{MODEL}/{path}", json=body), 422, field)
    assert counts(clean_db, Job, Evaluation) == (0, 0)


@pytest.mark.parametrize("value", [MAX_INT + 1, 2**64, -1, 0])
def test_evaluation_ids_out_of_range_are_422(client: TestClient, value: int) -> None:
    assert_names_field(client.get(f"/v1/models/{MODEL}/evaluations/{value}"), 422, "evaluation_id")
    resp = client.get(f"/v1/models/{MODEL}/evaluations", params={"version": MAX_INT + 1})
    assert_names_field(resp, 422, "version")


def test_an_id_in_range_that_does_not_exist_is_404(client: TestClient) -> None:
    assert_names_field(
        client.get(f"/v1/models/{MODEL}/evaluations/{MAX_INT}"), 404, "evaluation_id"
    )


def test_a_declared_oversize_body_is_refused_without_reading_it() -> None:
    """The declared Content-Length alone decides: the body is never received."""
    reached: list[str] = []

    async def app(scope: object, receive: object, send: object) -> None:
        reached.append("app")

    async def receive() -> dict[str, object]:
        raise AssertionError("the body was read")

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"50000000")]}
    asyncio.run(BodyLimit(app, CAP)(scope, receive, send))  # type: ignore[arg-type]
    assert reached == []
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["errors"][0]["type"] == "too_large"  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"\x80", b"\x00" * 9, b'{"to_version": 0\xff}'])
def test_a_body_that_is_not_utf8_json_is_422_naming_the_body(
    client: TestClient, clean_db: Engine, raw: bytes
) -> None:
    resp = client.post(
        f"/v1/models/{MODEL}/rollback", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_names_field(resp, 422, "body")
    assert counts(clean_db, Job) == (0,)


def _fresh_minute() -> None:
    """Start the counted requests well inside one clock minute (the window)."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def test_work_creating_posts_are_rate_limited_per_key(
    api_settings: Settings,
    app_client: Callable[[Settings], TestClient],
    clean_db: Engine,
) -> None:
    client = app_client(api_settings.model_copy(update={"rate_limit_per_minute": 3}))
    with Session(clean_db) as s:
        first = ledger_keys.create_key(s, "first", ["admin"])[1]
        second = ledger_keys.create_key(s, "second", ["admin"])[1]
        s.commit()
    auth = {"Authorization": f"Bearer {first}"}
    _fresh_minute()
    posts = [
        lambda: client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=auth),
        lambda: client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0}, headers=auth),
        lambda: client.post(
            f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"}, headers=auth
        ),
    ]
    assert [p().status_code for p in posts] == [202, 202, 202]
    over = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=auth)
    body = over.json()
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert "first" in body["detail"]
    assert counts(clean_db, Job) == (3,)
    # reads are not counted, nor are other keys' requests
    assert client.get(f"/v1/models/{MODEL}/edits", headers=auth).status_code == 200
    other = {"Authorization": f"Bearer {second}"}
    assert (
        client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=other).status_code == 202
    )


def test_a_replay_is_not_counted(
    api_settings: Settings, app_client: Callable[[Settings], TestClient], clean_db: Engine
) -> None:
    client = app_client(api_settings.model_copy(update={"rate_limit_per_minute": 1}))
    _fresh_minute()
    key = {"Idempotency-Key": "once"}
    answers = [client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=key)
               for _ in range(3)]  # fmt: skip
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert client.post(f"/v1/models/{MODEL}/edits", json=edit_body()).status_code == 429
    assert counts(clean_db, Job) == (1,)
