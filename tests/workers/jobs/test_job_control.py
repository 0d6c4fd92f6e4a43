"""Jobs for operators end to end on a tiny model: a job's Server-Sent Events stream
(every event in order, the stream closing at the end, a reconnect with
``Last-Event-ID`` resuming), the model's stream, and cancellation: a queued job at
once, a running one at its next safe point, never half committed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine

from service.ledger import events as ledger_events
from service.ledger import job_control
from service.ledger import jobs as ledger_jobs
from service.ledger.sessions import session_scope
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.workers.jobs.test_edit import MODEL, edit_body
from workers.jobs import edit as edit_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), guard=GuardPolicy(enabled=False))
    return model_settings(MODEL, spec, sync_timeout_s=60.0)


@pytest.fixture
def client(settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(settings)


def read_stream(client: TestClient, path: str, headers: dict[str, str] | None = None,
                stop_after: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The SSE events of ``path`` until the server closes the stream (or ``stop_after``)."""
    got: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", path, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "data" in current:
                got.append(current)
                current = {}
                if stop_after is not None and len(got) >= stop_after:
                    break
    return got


def test_a_jobs_stream_has_every_event_in_order_ends_and_resumes(
    client: TestClient, settings: Settings, redis_conn: Redis, db_engine: Engine
) -> None:
    harness.start_worker(MODEL, settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(3))  # ROME: 3 versions
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    live: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: live.extend(read_stream(
        client, f"/v1/jobs/{job_id}/events")))  # fmt: skip
    reader.start()
    time.sleep(0.5)  # the stream is open before the job runs
    harness.drain(MODEL, settings, redis_conn)
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not close when the job ended"

    with session_scope(db_engine) as s:
        stored = [(e.id, e.kind) for e in ledger_events.after(s, job_id=job_id, limit=1000)]
    assert [(e["id"], e["event"]) for e in live] == stored  # every event, in order
    kinds = [e["event"] for e in live]
    assert kinds[0] == "status" and live[0]["data"]["data"]["status"] == "queued"
    assert live[-1]["data"]["data"]["status"] == "succeeded"
    assert kinds.count("version") == 3 and kinds.count("progress") >= 3
    fractions = [e["data"]["data"]["progress"] for e in live if e["event"] == "progress"]
    assert fractions == sorted(fractions)  # progress only moves forward

    # a reconnect after the k-th event gets exactly the rest, and ends
    k = len(live) // 2
    resumed = read_stream(client, f"/v1/jobs/{job_id}/events",
                          headers={"Last-Event-ID": str(live[k - 1]["id"])})  # fmt: skip
    assert [e["id"] for e in resumed] == [e["id"] for e in live[k:]]
    # after the final event there is nothing more: the stream ends at once
    assert read_stream(client, f"/v1/jobs/{job_id}/events?after={live[-1]['id']}") == []
    bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422

    # the model's stream from the start holds the job's events and the versions
    model = read_stream(client, f"/v1/models/{MODEL}/events?after=0", stop_after=len(live))
    assert [e["id"] for e in model] == [e["id"] for e in live]


def test_cancel_a_queued_job_and_a_running_one_at_a_safe_point(
    client: TestClient,
    settings: Settings,
    redis_conn: Redis,
    db_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = harness.start_worker(MODEL, settings)
    before = state.runtime.tensor_hashes()
    queued = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(1)).json()["job_id"]
    r = client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 409

    # an operator cancels a 3-request ROME job as soon as its first version committed:
    # the worker stops between two versions; the committed one stays
    running = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(3)).json()["job_id"]
    apply_batch = edit_job._apply_batch
    calls: list[int] = []

    def operator_after_first_version(*args: Any, **kwargs: Any) -> Any:
        number = apply_batch(*args, **kwargs)
        calls.append(number)
        if len(calls) == 1:  # committed: the operator cancels from another connection
            with session_scope(db_engine) as other:
                job_control.cancel_job(other, running)
        return number

    monkeypatch.setattr(edit_job, "_apply_batch", operator_after_first_version)
    harness.drain(MODEL, settings, redis_conn)
    monkeypatch.setattr(edit_job, "_apply_batch", apply_batch)
    job = harness.job(client, running)
    assert job["status"] == "cancelled" and job["cancel_requested"], job
    assert job["result"]["versions"] == [1]
    edits = {e["subject"]: e["status"] for e in client.get(
        f"/v1/models/{MODEL}/edits?limit=10").json()["items"] if e["job_id"] == running}  # fmt: skip
    assert sorted(edits.values()) == ["applied", "cancelled", "cancelled"], edits

    # an evaluation cancelled while it runs stops at its first progress report
    ev = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "fluency", "params": {
        "max_new_tokens": 4, "prompts": ["Mozart"]}}).json()["job_id"]  # fmt: skip
    real = ledger_jobs.set_progress

    def cancel_first(session: Any, job_ids: Any, fraction: float, message: str) -> set[str]:
        if ev in job_ids:
            job_control.cancel_job(session, ev)
        return real(session, job_ids, fraction, message)

    monkeypatch.setattr(ledger_jobs, "set_progress", cancel_first)
    harness.drain(MODEL, settings, redis_conn)
    stopped = harness.job(client, ev)
    assert stopped["status"] == "cancelled", stopped
    evaluation = client.get(f"/v1/models/{MODEL}/evaluations").json()["items"][-1]
    assert evaluation["status"] == "cancelled"
    assert state.runtime.tensor_hashes() != before  # version 1 stays applied
    versions = harness.all_versions(client, MODEL)
    assert [v["number"] for v in versions] == [0, 1]
