"""Run a memedit worker inside the test process: load a model, sync it to the
ledger, and drain its queues with rq's SimpleWorker (what ``memedit worker`` does
forever)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from bench._chaos import all_versions, spawn_worker, stop, worker_env
from service.presence import Phase, Presence
from service.redis_clients import command_client
from service.settings import Settings
from workers.state import WorkerState
from workers.worker import StateWorker, build_state

__all__ = ["all_versions", "drain", "job", "spawn_worker", "start_worker", "stop",
           "while_draining", "worker_env"]  # fmt: skip

# the state start_worker built last, per model: what drain runs the jobs with
_LAST: dict[str, WorkerState] = {}


def start_worker(model: str, settings: Settings) -> WorkerState:
    """Build the worker's state (load, register, warm, sync) and announce it as ready,
    as ``memedit worker`` does (its record lives for ten minutes: no heartbeat)."""
    state = build_state(model, settings)
    presence = Presence(
        command_client(settings.redis_url),
        settings.queue_prefix,
        model,
        f"test-worker-{model}",
        version=lambda: state.runtime.current_version,
        ttl_s=600,
    )
    presence.set(Phase.ready)
    _LAST[model] = state
    return state


def drain(model: str, settings: Settings, redis: Redis, state: WorkerState | None = None) -> None:
    """Run the model's queues until they are empty, with the worker's state (default:
    the one :func:`start_worker` built last)."""
    queues = [
        Queue(settings.read_queue(model), connection=redis),
        Queue(settings.edit_queue(model), connection=redis),
        Queue(settings.eval_queue(model), connection=redis),
    ]
    StateWorker(queues, state=state or _LAST[model], connection=redis).work(burst=True)


def while_draining(
    model: str, settings: Settings, redis: Redis, work: Callable[[], Any], timeout_s: float = 120
) -> Any:
    """Run ``work`` (a client that waits on the worker) in a thread while this thread
    drains the model's queues; its return value, or its exception raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + timeout_s
    while t.is_alive() and time.monotonic() < deadline:
        drain(model, settings, redis)
        time.sleep(0.05)
    t.join(timeout=5)
    if "error" in out:
        raise out["error"]
    return out["value"]


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}").json()
