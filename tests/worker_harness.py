"""Run a memedit worker inside the test process: load a model, sync it to the
ledger, and drain its queues with rq's SimpleWorker (what ``memedit worker`` does
forever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from service.presence import Phase, Presence
from service.redis_clients import command_client
from service.settings import Settings
from workers.state import WorkerState
from workers.worker import StateWorker, build_state

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


def all_versions(client: TestClient, model: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/models/{model}/versions", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def job(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}").json()


def worker_env(settings: Settings, model: str, **extra: str) -> dict[str, str]:
    """The environment of a ``memedit worker`` process serving ``model`` with
    ``settings`` (this process's environment without memedit's own variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMEDIT_")}
    env.update(
        MEMEDIT_DATABASE_URL=settings.database_url,
        MEMEDIT_REDIS_URL=settings.redis_url,
        MEMEDIT_MODELS=json.dumps({model: settings.models[model].model_dump()}),
        MEMEDIT_ARTIFACT_DIR=str(settings.artifact_dir),
        MEMEDIT_CACHE_DIR=str(settings.effective_cache_dir),
        MEMEDIT_WARM_STATISTICS="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def spawn_worker(
    settings: Settings, model: str, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """Start ``memedit worker --model MODEL`` as a child process logging to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--model", model],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env(settings, model, **extra),
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit in ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
