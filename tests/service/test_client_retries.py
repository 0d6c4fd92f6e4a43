"""The client's retries (service/client.py), against a scripted HTTP transport: a 503
with Retry-After is retried with the same Idempotency-Key (so the service makes one
job), an error without it is raised at once, and the error names the field."""

from __future__ import annotations

import httpx
import pytest

from service.client import ApiError, Client

CREATED = {"job_id": "0b6f0c1e-0000-0000-0000-000000000000", "edit_ids": [1],
           "worker": {"state": "ready", "workers": 1}}  # fmt: skip
REQ = [{"prompt": "{} is in", "subject": "x", "target_new": "y"}]


def test_a_503_with_retry_after_is_retried_with_the_same_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(503, json={"detail": "busy", "errors": []},
                                  headers={"Retry-After": "0"})  # fmt: skip
        return httpx.Response(202, json=CREATED)

    with Client("http://memedit", transport=httpx.MockTransport(answer)) as client:
        job = client.edit("m", REQ)
    assert job.id == CREATED["job_id"] and len(seen) == 2
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(keys) == 1 and keys != {""}


def test_errors_are_raised_with_their_field_and_reads_carry_no_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"detail": "requests.0.prompt: bad", "errors": [
            {"field": "requests.0.prompt", "message": "bad", "type": "value_error"}]}  # fmt: skip
        return httpx.Response(422, json=body)

    with Client("http://memedit", key="mk_x", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(ApiError) as refused:
            client.edit("m", REQ)
        with pytest.raises(ApiError):
            client.job("j")
    assert refused.value.status == 422 and refused.value.field == "requests.0.prompt"
    assert len(seen) == 2  # no retry of a 422
    assert seen[0].headers["Authorization"] == "Bearer mk_x"
    assert "Idempotency-Key" not in seen[1].headers  # a GET creates nothing
