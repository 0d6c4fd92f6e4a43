"""Fuzz every operation of the OpenAPI document (schemathesis; a fixed number of
examples per operation, derandomised so that CI runs the same requests) against the
API under a real uvicorn server, the real PostgreSQL and Redis, with an admin key.

Checked for every generated request: no answer is a 500 (the one documented 5xx
that this setup can answer is the 503 of score and generate while no worker serves
the model), every status is one the document lists for the operation (405 for a
method the path does not have), and a refused
request (4xx) leaves every ledger table's row count as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from service.api import create_app
from service.ledger import keys as ledger_keys
from service.settings import Settings
from tests.conftest import LEDGER_TABLES
from tests.served import serve
from tests.tars import tar_bytes

pytestmark = pytest.mark.e2e

EXAMPLES = 25  # per operation


# the import's body is a tar archive: random bytes, and archives that are tars but
# not patches, or patches of tensors no base here has
_MANIFEST = {"format": "memedit-patch", "format_version": 1, "edits": [],
             "tensors": {"w": {"base_sha256": "0" * 64, "sha256": "1" * 64}}}  # fmt: skip
schemathesis.openapi.media_type(
    "application/x-tar",
    st.one_of(
        st.binary(max_size=64),
        st.sampled_from(
            [
                tar_bytes({}),
                tar_bytes({"manifest.json": b"{"}),
                tar_bytes({"manifest.json": json.dumps(_MANIFEST).encode()}),
            ]
        ),
    ),  # fmt: skip
)
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
READS = ("/v1/models/{model}/score", "/v1/models/{model}/generate")
OPEN_PATHS = ("/healthz", "/healthz/workers", "/metrics")


@pytest.fixture
def url(api_settings: Settings, clean_db: Engine, redis_conn: object) -> Iterator[str]:
    # the event streams run until they close: a second here (tests/workers/jobs/test_job_control.py)
    with serve(api_settings.model_copy(update={"event_stream_max_s": 1.0})) as base:
        yield base


@pytest.fixture
def admin(clean_db: Engine) -> dict[str, str]:
    """An admin key: every request is sent with it (tests/service/api/test_auth.py
    covers the requests without one)."""
    with Session(clean_db) as s:
        _, secret = ledger_keys.create_key(s, "fuzzer", ["admin"])
        s.commit()
    return {"Authorization": f"Bearer {secret}"}


def _rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in LEDGER_TABLES
        }


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_fuzzed_requests_get_documented_answers(
    case,  # noqa: ANN001
    url: str,
    clean_db: Engine,
    admin: dict[str, str],
    api_settings: Settings,
) -> None:
    before = _rows(clean_db)
    with requests.Session() as http:
        resp = case.call(base_url=url, session=http, headers=admin, timeout=30)
    status = resp.status_code
    what = (f"{case.method} {case.formatted_path} {resp.request.headers.get('Content-Type')} "
            f"{(resp.request.body or b'')[:80]!r} -> {status}: {resp.text[:300]}")  # fmt: skip
    if case.method.upper() != case.operation.method.upper():
        # schemathesis also sends methods the path does not have
        assert status == 405, what
        return
    if resp.request.headers.get("Authorization") == admin["Authorization"]:
        assert status not in (401, 403), f"the admin key was not accepted: {what}"
    elif case.operation.path not in OPEN_PATHS:  # schemathesis dropped or mangled the key
        assert status == 401, what
    documented = set(case.operation.definition.raw.get("responses", {}))
    assert str(status) in documented, f"undocumented status: {what}"
    if status >= 500:
        assert status == 503 and case.operation.path in READS, what
        assert "no worker serves" in resp.json()["detail"], what
    if 400 <= status < 500:
        assert _rows(clean_db) == before, f"a refused request stored something: {what}"
        kept = list((Path(api_settings.artifact_dir) / "upload").rglob("*.tar"))
        assert not kept, f"a refused upload was kept: {what}"
