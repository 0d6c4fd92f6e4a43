"""Score and generate: the API waits for a worker's answer on the model's read queue.

The success paths run a real rq ``SimpleWorker`` in burst mode in this process, on
the real Redis, with the stand-in job functions of :mod:`.fake_worker` (the real
ones need a loaded model; the end-to-end tests cover those). The worker's record
(:mod:`service.presence`) is published as a worker process does (``announce``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job as RqJob
from sqlalchemy import Engine

from service import queue as service_queue
from service.api import create_app
from service.presence import Phase
from service.redis_clients import COMMAND_TIMEOUT_S
from service.settings import Settings
from tests.conftest import LOOPBACK
from tests.service.conftest import MODEL, OTHER, announce

from . import fake_worker

FAKE = "tests.service.api.routes.fake_worker"


@pytest.fixture
def patient_client(
    api_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> Iterator[TestClient]:
    """A client whose API waits long enough for the in-test worker to start; both
    models' workers are announced as ready."""
    with TestClient(
        create_app(api_settings.model_copy(update={"sync_timeout_s": 20})), client=LOOPBACK
    ) as c:
        announce(api_settings, MODEL)
        announce(api_settings, OTHER)
        yield c


def _call_with_worker(
    redis_conn: Redis, queue_name: str, call: Callable[[], httpx.Response]
) -> httpx.Response:
    """Send the request from a thread, then work the queue in burst mode here."""
    queue = Queue(queue_name, connection=redis_conn)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(call)
        deadline = time.monotonic() + 10
        while queue.count == 0 and time.monotonic() < deadline and not future.done():
            time.sleep(0.02)
        assert queue.count == 1, future.result() if future.done() else "nothing was enqueued"
        SimpleWorker([queue], connection=redis_conn).work(burst=True)
        return future.result(timeout=30)


def _use_fakes(monkeypatch: pytest.MonkeyPatch, score: str, generate: str) -> None:
    monkeypatch.setitem(service_queue.READ_FUNCTIONS, "score", f"{FAKE}.{score}")
    monkeypatch.setitem(service_queue.READ_FUNCTIONS, "generate", f"{FAKE}.{generate}")


def test_score_success(
    patient_client: TestClient,
    redis_conn: Redis,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_fakes(monkeypatch, "score", "generate")
    body = {
        "prompts": ["The Eiffel Tower is located in", "Big Ben is in"],
        "targets": ["Rome", "X"],
    }
    resp = _call_with_worker(
        redis_conn,
        api_settings.read_queue(MODEL),
        lambda: patient_client.post(f"/v1/models/{MODEL}/score", json=body),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"logprobs": [-34.0, -14.0], "version": fake_worker.VERSION}
    queue = Queue(api_settings.read_queue(MODEL), connection=redis_conn)
    assert queue.name == f"memedit:reads:{MODEL}"
    (job_id,) = queue.finished_job_registry.get_job_ids()
    job = RqJob.fetch(job_id, connection=redis_conn)
    assert job.kwargs == {"model": MODEL, **body}


def test_generate_success(
    patient_client: TestClient,
    redis_conn: Redis,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_fakes(monkeypatch, "score", "generate")
    resp = _call_with_worker(
        redis_conn,
        api_settings.read_queue(OTHER),
        lambda: patient_client.post(
            f"/v1/models/{OTHER}/generate", json={"prompt": "Paris is", "max_new_tokens": 4}
        ),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"text": f"Paris is [{OTHER}:4]", "version": fake_worker.VERSION}


def test_worker_exception_is_502_with_its_message(
    patient_client: TestClient,
    redis_conn: Redis,
    api_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_fakes(monkeypatch, "fail", "fail")
    resp = _call_with_worker(
        redis_conn,
        api_settings.read_queue(MODEL),
        lambda: patient_client.post(f"/v1/models/{MODEL}/generate", json={"prompt": "Hi"}),
    )
    assert resp.status_code == 502, resp.text
    detail = resp.json()["detail"]
    assert "RuntimeError: this worker serves another model, not 'smollm2-135m'" in detail
    assert resp.json()["errors"][0]["type"] == "worker_failed"
    # no max_new_tokens given: the default (20) capped at the server's maximum (16)
    queue = Queue(api_settings.read_queue(MODEL), connection=redis_conn)
    (job_id,) = queue.failed_job_registry.get_job_ids()
    assert RqJob.fetch(job_id, connection=redis_conn).kwargs["max_new_tokens"] == 16


READS = [
    ("score", {"prompts": ["The Eiffel Tower is located in"], "targets": ["Rome"]}),
    ("generate", {"prompt": "The Eiffel Tower is located in", "max_new_tokens": 3}),
]


@pytest.mark.parametrize(("path", "body"), READS)
def test_no_worker_is_503_at_once_with_retry_after(
    client: TestClient, redis_conn: Redis, path: str, body: dict[str, Any]
) -> None:
    started = time.monotonic()
    resp = client.post(f"/v1/models/{MODEL}/{path}", json=body)
    elapsed = time.monotonic() - started
    assert resp.status_code == 503, resp.text
    assert "no worker serves model" in resp.json()["detail"]
    assert resp.json()["errors"][0]["type"] == "worker_unavailable"
    assert resp.json()["worker"]["state"] == "no worker"
    assert int(resp.headers["Retry-After"]) > 0
    assert elapsed < 1.0  # it did not wait sync_timeout_s for nobody
    assert redis_conn.keys("rq:job:*") == []


@pytest.mark.parametrize(("path", "body"), READS)
def test_a_worker_that_does_not_answer_in_time_is_503_and_the_request_is_withdrawn(
    client: TestClient,
    redis_conn: Redis,
    api_settings: Settings,
    path: str,
    body: dict[str, Any],
) -> None:
    announce(api_settings, MODEL, Phase.loading, message="loading the model")
    started = time.monotonic()
    resp = client.post(f"/v1/models/{MODEL}/{path}", json=body)
    elapsed = time.monotonic() - started
    assert resp.status_code == 503, resp.text
    assert "did not answer" in resp.json()["detail"]
    assert "its worker is loading: loading the model" in resp.json()["detail"], resp.text
    assert resp.json()["worker"]["state"] == "loading"
    assert resp.json()["worker"]["workers"] == 1
    assert int(resp.headers["Retry-After"]) > 0
    assert api_settings.sync_timeout_s <= elapsed < api_settings.sync_timeout_s + 2
    queue = Queue(api_settings.read_queue(MODEL), connection=redis_conn)
    assert queue.count == 0
    assert redis_conn.keys("rq:job:*") == []


def test_a_read_waits_longer_than_a_command_timeout_behind_busy_work(
    patient_client: TestClient, redis_conn: Redis, api_settings: Settings, monkeypatch
) -> None:
    """The worker is busy for 7 s (an edit, a statistics step) when the read arrives:
    the API's wait outlasts the clients' 5 s command timeout and is answered. (With a
    client built on redis-py 8's defaults, the wait failed after 5 s with a 503.)"""
    _use_fakes(monkeypatch, "score", "generate")
    busy_s = COMMAND_TIMEOUT_S + 2
    queue = Queue(api_settings.read_queue(MODEL), connection=redis_conn)
    queue.enqueue(f"{FAKE}.busy", busy_s)
    body = {"prompt": "Paris is", "max_new_tokens": 4}
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        future = pool.submit(lambda: patient_client.post(f"/v1/models/{MODEL}/generate", json=body))
        deadline = time.monotonic() + 10
        while queue.count < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        SimpleWorker([queue], connection=redis_conn).work(burst=True)
        resp = future.result(timeout=30)
        elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == f"Paris is [{MODEL}:4]"
    assert elapsed > busy_s


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a", "b"], "targets": ["x"]}, "targets"),
        ({"prompts": ["a"] * 4, "targets": ["x"] * 4}, "prompts"),
        ({"prompts": [], "targets": []}, "prompts"),
        ({"prompts": ["a"], "targets": [""]}, "targets.0"),
        ({"prompts": [" "], "targets": ["x"]}, "prompts.0"),
        ({"prompts": "a", "targets": ["x"]}, "prompts"),
        ({"targets": ["x"]}, "prompts"),
        ({"prompts": ["a"], "targets": ["x"], "temperature": 1}, "temperature"),
        ({"prompts": ["a"], "targets": ["x"], "version": 7}, "version"),  # no such version
        ({"prompts": ["a"], "targets": ["x"], "version": True}, "version"),
        ({"prompts": ["a"], "targets": ["x"], "version": -1}, "version"),
    ],
)
def test_invalid_score_is_422(
    client: TestClient, redis_conn: Redis, body: dict[str, Any], field: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/score", json=body)
    assert resp.status_code == 422, resp.text
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert redis_conn.keys("rq:job:*") == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "Hi", "max_new_tokens": 17}, "max_new_tokens"),
        ({"prompt": "Hi", "max_new_tokens": "many"}, "max_new_tokens"),
        ({"prompt": "", "max_new_tokens": 3}, "prompt"),
        ({"max_new_tokens": 3}, "prompt"),
        ({"prompt": "Hi", "version": 7}, "version"),
    ],
)
def test_invalid_generate_is_422(
    client: TestClient, redis_conn: Redis, body: dict[str, Any], field: str
) -> None:
    resp = client.post(f"/v1/models/{MODEL}/generate", json=body)
    assert resp.status_code == 422, resp.text
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert redis_conn.keys("rq:job:*") == []


def test_reads_of_unknown_model_are_404(client: TestClient, redis_conn: Redis) -> None:
    for path, body in (
        ("score", {"prompts": ["a"], "targets": ["b"]}),
        ("generate", {"prompt": "a", "max_new_tokens": 2}),
    ):
        resp = client.post(f"/v1/models/nope/{path}", json=body)
        assert resp.status_code == 404
        assert resp.json()["errors"][0]["field"] == "model"
    assert redis_conn.keys("rq:*") == []
