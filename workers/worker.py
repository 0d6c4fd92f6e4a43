"""The worker process: loads one model once, syncs it to the ledger's head, and
serves that model's queues with a non-forking rq worker (the model lives here).

Queues, in priority order: ``<prefix>:reads:<model>`` (score, generate),
``<prefix>:edits:<model>`` (edit and rollback jobs) and ``<prefix>:evals:<model>``
(evaluation jobs: they run when no edit waits). A forked job child could not
keep its weight changes, so the worker is rq's ``SimpleWorker``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from rq import Queue, SimpleWorker

from service.settings import ModelSpec, Settings, get_settings
from workers.artifacts import ArtifactStore
from workers.models.loading import load_model
from workers.runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """Everything a job needs from the process that runs it."""

    name: str
    spec: ModelSpec
    settings: Settings
    runtime: ModelRuntime
    store: ArtifactStore
    model_id: int
    # editor caches (context templates, statistics, inverses): live as long as the model
    cache: dict[str, Any] = field(default_factory=dict)


_STATE: WorkerState | None = None


def current_state() -> WorkerState:
    if _STATE is None:
        raise RuntimeError(
            "this job must run inside a memedit worker (memedit worker --model NAME), "
            "which holds the model"
        )
    return _STATE


def set_state(state: WorkerState | None) -> None:
    global _STATE
    _STATE = state


def build_state(name: str, settings: Settings | None = None) -> WorkerState:
    """Load the model, register it in the ledger and sync it to the ledger's head."""
    from workers import startup  # noqa: PLC0415  (startup imports this module)

    settings = settings or get_settings()
    if name not in settings.models:
        raise ValueError(f"unknown model {name!r}; configured: {sorted(settings.models)}")
    spec = settings.models[name]
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    artifact_dir = Path(settings.artifact_dir)
    log.info("loading %s from %s on %s", name, spec.source, settings.device)
    loaded = load_model(
        spec.source,
        dtype=spec.dtype,
        device=settings.device,
        revision=spec.revision,
        cache_dir=settings.effective_cache_dir,
    )
    runtime = ModelRuntime(loaded)
    store = ArtifactStore(artifact_dir)
    state = WorkerState(
        name=name, spec=spec, settings=settings, runtime=runtime, store=store, model_id=-1
    )
    state.model_id = startup.register_model(state)
    startup.stats_cache(state)  # keyed by the base weights' fingerprint: take it before syncing
    if settings.warm_statistics:
        startup.warm_statistics(state)  # on the base weights, before syncing to the head
        startup.warm_editors(state)
    startup.sync_to_head(state)
    return state


def main(name: str, *, burst: bool = False) -> None:
    """Entry point of ``memedit worker``."""
    from workers import startup  # noqa: PLC0415

    settings = get_settings()
    state = build_state(name, settings)
    set_state(state)
    conn = Redis.from_url(settings.redis_url)
    queues = [
        Queue(settings.read_queue(name), connection=conn),
        Queue(settings.edit_queue(name), connection=conn),
        Queue(settings.eval_queue(name), connection=conn),
    ]
    startup.requeue_unfinished(state, queues[1])
    worker = SimpleWorker(
        queues, connection=conn, name=f"memedit-{name}-{socket.gethostname()}-{os.getpid()}"
    )
    log.info("worker for %s ready at version %s", name, state.runtime.current_version)
    try:
        worker.work(burst=burst, logging_level=logging.getLevelName(log.getEffectiveLevel()))
    finally:
        set_state(None)
