"""API keys (service/api/auth.py, service/ledger/keys.py): an auth matrix over every
operation of the OpenAPI document (no key → 401, a key without the scope → 403, a
key with it → the route's own answer), admin keys, revocation, the loopback rule
with no key defined, and ``requested_by`` in the ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.api import create_app
from service.ledger import keys as ledger_keys
from service.settings import Settings
from tests.service.conftest import MODEL, add_versions, edit_body

JOB = "00000000-0000-0000-0000-000000000000"
# operation -> (scope, body, the answer with the right scope); score and generate
# answer 503 here because no worker serves the model (tests/service/api/routes/test_reads.py
# has them answered)
ROUTES: dict[tuple[str, str], tuple[str, dict[str, Any] | None, int]] = {
    ("GET", "/v1/models"): ("reads", None, 200),
    ("PUT", "/v1/models/{model}/policy"): ("admin", {"evaluations": []}, 200),
    ("POST", "/v1/models/{model}/edits"): ("edits:write", edit_body(), 202),
    ("GET", "/v1/models/{model}/edits"): ("reads", None, 200),
    ("GET", "/v1/jobs/{job_id}"): ("reads", None, 404),
    ("GET", "/v1/models/{model}/versions"): ("reads", None, 200),
    ("POST", "/v1/models/{model}/rollback"): ("edits:write", {"to_version": 0}, 202),
    ("GET", "/v1/models/{model}/guard-decisions"): ("reads", None, 200),
    ("POST", "/v1/models/{model}/evaluations"): ("evaluations", {"suite": "retention"}, 202),
    ("GET", "/v1/models/{model}/evaluations"): ("reads", None, 200),
    ("GET", "/v1/models/{model}/evaluations/{evaluation_id}"): ("reads", None, 404),
    ("GET", "/v1/models/{model}/alerts"): ("reads", None, 200),
    ("POST", "/v1/models/{model}/score"): ("reads", {"prompts": ["a"], "targets": ["b"]}, 503),
    ("POST", "/v1/models/{model}/generate"): ("reads", {"prompt": "a"}, 503),
    ("GET", "/v1/jobs"): ("reads", None, 200),
    # either scope may ask; which one a job needs depends on its kind (test below)
    ("POST", "/v1/jobs/{job_id}/cancel"): ("edits:write|evaluations", None, 404),
    ("GET", "/v1/jobs/{job_id}/events"): ("reads", None, 404),
    ("GET", "/v1/models/{model}/events"): ("reads", None, 200),
    ("GET", "/v1/models/{model}/edits/{edit_id}"): ("reads", None, 404),
    ("GET", "/v1/models/{model}/versions/{number}"): ("reads", None, 200),
    ("GET", "/v1/models/{model}/series/{name}"): ("reads", None, 200),
    ("POST", "/v1/models/{model}/exports"): ("edits:write", {"format": "patch"}, 202),
    ("GET", "/v1/models/{model}/exports/{export_id}"): ("reads", None, 404),
    ("GET", "/v1/models/{model}/exports/{export_id}/download"): ("reads", None, 404),
    # the body is the archive itself: JSON is no tar (tests/workers/jobs/test_export.py)
    ("POST", "/v1/models/{model}/imports"): ("edits:write", {"not": "a tar"}, 422),
}
# query strings the calls need (an endless stream that ends at once)
QUERY = {("GET", "/v1/models/{model}/events"): "?follow=false"}
OPEN = {("GET", "/healthz"), ("GET", "/healthz/workers"), ("GET", "/metrics")}


@pytest.fixture
def keys(client: TestClient, clean_db: Engine) -> dict[str, str]:
    """One key per scope, and one that was revoked: name -> secret."""
    with Session(clean_db) as s:
        add_versions(s, MODEL, 1)
        secrets = {scope: ledger_keys.create_key(s, scope.replace(":", "-"), [scope])[1]
                   for scope in ledger_keys.SCOPES}  # fmt: skip
        secrets["revoked"] = ledger_keys.create_key(s, "old", ["admin"])[1]
        ledger_keys.revoke_key(s, "old")
        s.commit()
    return secrets


def _call(client: TestClient, route: tuple[str, str], secret: str | None) -> Any:
    method, template = route
    path = template.format(model=MODEL, job_id=JOB, evaluation_id=1, edit_id=1, number=0,
                           name="drift", export_id=JOB) + QUERY.get(route, "")  # fmt: skip
    body = ROUTES[route][1]
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return client.request(method, path, json=body, headers=headers)


def test_the_matrix_covers_every_operation(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert operations == set(ROUTES) | OPEN
    for method, path in ROUTES:
        op = spec["paths"][path][method.lower()]
        assert op["security"] == [{"HTTPBearer": []}], (method, path)
        assert {"401", "403"} <= set(op["responses"]), (method, path)


@pytest.mark.parametrize("route", list(ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
def test_every_route_needs_a_key_with_its_scope(
    client: TestClient, keys: dict[str, str], route: tuple[str, str]
) -> None:
    scope, _, success = ROUTES[route]
    missing = _call(client, route, None)
    assert missing.status_code == 401, missing.text
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    for bad in ("mk_not-a-key", keys["revoked"], "not-even-the-prefix"):
        assert _call(client, route, bad).status_code == 401
    scopes = scope.split("|")
    for other in ledger_keys.SCOPES:
        if other not in (*scopes, "admin"):
            wrong = _call(client, route, keys[other])
            assert wrong.status_code == 403, (other, wrong.text)
            assert all(s in wrong.json()["detail"] for s in scopes)
    for allowed in (*scopes, "admin"):
        resp = _call(client, route, keys[allowed])
        assert resp.status_code == success, (allowed, resp.text)


def test_cancelling_a_job_needs_the_scope_of_its_kind(
    client: TestClient, keys: dict[str, str]
) -> None:
    def bearer(scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[scope]}"}

    edit = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=bearer("edits:write"))
    ev = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"},
                     headers=bearer("evaluations"))  # fmt: skip
    edit_id, ev_id = edit.json()["job_id"], ev.json()["job_id"]
    refused = client.post(f"/v1/jobs/{edit_id}/cancel", headers=bearer("evaluations"))
    assert refused.status_code == 403 and "edits:write" in refused.json()["detail"]
    refused = client.post(f"/v1/jobs/{ev_id}/cancel", headers=bearer("edits:write"))
    assert refused.status_code == 403 and "'evaluations'" in refused.json()["detail"]
    ok = client.post(f"/v1/jobs/{edit_id}/cancel", headers=bearer("edits:write"))
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
    ok = client.post(f"/v1/jobs/{ev_id}/cancel", headers=bearer("evaluations"))
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"


def test_health_stays_open(client: TestClient, keys: dict[str, str]) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz/workers").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_the_ledger_records_which_key_asked(client: TestClient, keys: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {keys['edits:write']}"}
    created = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(), headers=auth).json()
    read = {"Authorization": f"Bearer {keys['reads']}"}
    job = client.get(f"/v1/jobs/{created['job_id']}", headers=read).json()
    assert job["requested_by"] == "edits-write"
    (edit,) = client.get(f"/v1/models/{MODEL}/edits", headers=read).json()["items"]
    assert edit["requested_by"] == "edits-write"


def test_without_keys_only_loopback_clients_are_served(
    api_settings: Settings, app_client: Callable[[Settings], TestClient]
) -> None:
    local = app_client(api_settings)
    assert local.get("/v1/models").status_code == 200
    job = local.post(f"/v1/models/{MODEL}/edits", json=edit_body()).json()["job_id"]
    assert local.get(f"/v1/jobs/{job}").json()["requested_by"] is None
    with TestClient(create_app(api_settings), client=("10.1.2.3", 4000)) as remote:
        resp = remote.get("/v1/models")
        assert resp.status_code == 403
        assert "memedit keys create" in resp.json()["detail"]
        assert remote.get("/healthz").status_code == 200
    insecure = api_settings.model_copy(update={"insecure_no_auth": True})
    with TestClient(create_app(insecure), client=("10.1.2.3", 4000)) as remote:
        assert remote.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("name", "scopes", "field"),
    [("", ["reads"], "name"), ("has space", ["reads"], "name"), ("x" * 65, ["reads"], "name"),
     ("ok", [], "scope"), ("ok", ["write"], "scope")],
)  # fmt: skip
def test_bad_keys_are_refused(session: Session, name: str, scopes: list[str], field: str) -> None:
    from service.errors import InvalidInput  # noqa: PLC0415

    with pytest.raises(InvalidInput) as exc:
        ledger_keys.create_key(session, name, scopes)
    assert exc.value.field == field


def test_secrets_are_stored_hashed(session: Session) -> None:
    key, secret = ledger_keys.create_key(session, "ops", ["reads", "reads"])
    assert key.scopes == ["reads"]
    assert secret.startswith("mk_") and len(secret) > 40
    assert secret not in (key.secret_sha256, key.prefix) and key.prefix == secret[:10]
    assert ledger_keys.authenticate(session, secret) is key
    assert ledger_keys.authenticate(session, secret + "x") is None
