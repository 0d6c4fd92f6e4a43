"""The worker process: loads one model once, syncs it to the ledger's head, and
serves that model's queues with a non-forking rq worker (the model lives here).

Queues, in priority order: ``<prefix>:reads:<model>`` (score, generate),
``<prefix>:edits:<model>`` (edit and rollback jobs) and ``<prefix>:evals:<model>``
(evaluation jobs: they run when no edit waits). A forked job child could not
keep its weight changes, so the worker is rq's ``SimpleWorker``.

Start-up (:func:`startup_steps`) is loading the weights and registering them, then
the layer statistics and the editors' caches, then syncing to the ledger's head.
The statistics take minutes on a CPU, so they run in steps inside the rq loop
(:class:`StartingWorker`): between two steps the worker answers the reads waiting
on its read queue, if its weights are the head's (a ledger at version 0, or
statistics already cached). Edits, rollbacks and evaluations wait in their queues
until start-up is done. The worker's state is published in Redis all along
(:mod:`service.presence`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job as RqJob

from service.artifacts import ArtifactStore
from service.ledger.lease import WriterLease
from service.presence import Phase, Presence
from service.redis_clients import WORKER_TTL_S, command_client, worker_client
from service.settings import Settings, get_settings
from workers.editing.common.stats import StatsCache, Steps, run_steps
from workers.editing.common.templates import TemplateCache
from workers.evaluation.canary import CanaryCache
from workers.models.loading import load_model, weights_fingerprint
from workers.reconciler import Reconciler
from workers.roles import CHECK_S, Roles
from workers.runtime import ModelRuntime
from workers.state import WorkerState

log = logging.getLogger(__name__)


def load_state(name: str, settings: Settings | None = None) -> WorkerState:
    """Load the model and register it in the ledger (the base weights' hashes)."""
    from workers import startup  # noqa: PLC0415  (startup imports the job side)

    settings = settings or get_settings()
    if name not in settings.models:
        raise ValueError(f"unknown model {name!r}; configured: {sorted(settings.models)}")
    spec = settings.models[name]
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    log.info("loading %s from %s on %s", name, spec.source, settings.device)
    loaded = load_model(
        spec.source,
        dtype=spec.dtype,
        device=settings.device,
        revision=spec.revision,
        cache_dir=settings.effective_cache_dir,
    )
    runtime = ModelRuntime(loaded)
    model_id = startup.register(runtime, name, spec, settings)
    # the statistics are keyed by the base weights: fingerprint them before any replay
    fingerprint = weights_fingerprint(runtime.model)
    state = WorkerState(
        name=name,
        spec=spec,
        settings=settings,
        runtime=runtime,
        store=ArtifactStore(Path(settings.artifact_dir)),
        model_id=model_id,
        stats=StatsCache(settings.effective_cache_dir / "stats", fingerprint),
        base_fingerprint=fingerprint,
        templates=TemplateCache(settings.effective_cache_dir / "templates", fingerprint),
        canary=CanaryCache(spec.guard.canary_texts) if spec.guard.enabled else None,
    )
    # statistics computed by any worker of this base are named in the ledger and reused
    state.stats.shared = startup.LedgerStats(state)
    return state


def startup_steps(state: WorkerState) -> Steps[int]:
    """The rest of start-up after :func:`load_state`, in steps: the statistics and
    editor caches on the base weights (``warm_statistics``), then the sync to the
    ledger's head. Returns the head version."""
    from workers import startup  # noqa: PLC0415

    if state.settings.warm_statistics:
        yield from startup.warm_steps(state)  # on the base weights, before syncing
    return startup.sync_to_head(state)


def build_state(name: str, settings: Settings | None = None) -> WorkerState:
    """Load the model, register it, warm its caches and sync it to the ledger's head,
    all before returning (tests and tools; ``memedit worker`` does it in its loop)."""
    state = load_state(name, settings)
    run_steps(startup_steps(state))
    return state


class StateJob(RqJob):
    """An rq job that passes the worker's state to a function marked
    :func:`~workers.state.needs_state` (as its first argument). The worker sets
    :attr:`worker_state` before it runs the job; the queue carries only the other arguments."""

    worker_state: WorkerState | None = None

    def _execute(self) -> Any:
        if getattr(self.func, "__memedit_state__", False):
            if self.worker_state is None:
                raise RuntimeError(
                    f"{self.func_name} must run in a memedit worker, which holds the model "
                    "(memedit worker --model NAME)"
                )
            return self.func(self.worker_state, *self.args, **self.kwargs)
        return super()._execute()


class StateWorker(SimpleWorker):
    """rq's non-forking worker (the model lives in this process) whose jobs get the
    worker's :class:`~workers.state.WorkerState` (:class:`StateJob`)."""

    def __init__(self, queues: Sequence[Queue], *, state: WorkerState | None, **kwargs: Any):
        kwargs.setdefault("job_class", StateJob)
        super().__init__(list(queues), **kwargs)
        self.worker_state = state  # (rq's workers have a `state` of their own)

    def execute_job(self, job: Any, queue: Queue) -> Any:
        if isinstance(job, StateJob):
            job.worker_state = self.worker_state
        return super().execute_job(job, queue)


class StartingWorker(StateWorker):
    """A :class:`StateWorker` that finishes the worker's start-up inside its loop.

    Until ``startup`` (a step generator) is exhausted, each dequeue first answers a
    job waiting on ``read_queue`` when ``reads_ok``, else runs the next start-up
    step; the other queues are not looked at. Then it is a plain StateWorker. A
    start-up step that raises stops the worker; :attr:`startup_error` keeps it.
    """

    def __init__(
        self,
        queues: Sequence[Queue],
        *,
        startup: Steps[Any],
        read_queue: Queue,
        reads_ok: bool,
        presence: Presence | None = None,
        state: WorkerState | None = None,
        roles: Roles | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(queues, state=state, **kwargs)
        self._startup: Steps[Any] | None = startup
        self._read_queue = read_queue
        self._reads_ok = reads_ok
        self._presence = presence
        self._roles = roles
        self.startup_error: BaseException | None = None
        if state is not None:
            state.starting = True  # reads between steps must not move the weights

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> Any:
        while self._startup is not None:
            if self._reads_ok:
                found = self._dequeue_read()
                if found is not None:
                    return found
            self._step()
        if self._roles is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if timeout is None:  # burst: one look at the lease, then what is queued
            self._roles.check(self)
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        while True:  # the lease is looked at before each job and every CHECK_S idle
            self._roles.check(self)
            found = super().dequeue_job_and_maintain_ttl(CHECK_S, CHECK_S)
            if found is not None:
                return found

    def _dequeue_read(self) -> Any:
        """A job of the read queue if one waits (no blocking), through rq's own
        dequeue so that the worker's bookkeeping stays rq's."""
        queues, self._ordered_queues = self._ordered_queues, [self._read_queue]
        try:
            return super().dequeue_job_and_maintain_ttl(None)
        finally:
            self._ordered_queues = queues

    def _step(self) -> None:
        steps = self._startup
        if steps is None:
            return
        try:
            fraction, message = next(steps)
        except StopIteration:
            self._startup = None
            if self.worker_state is not None:
                self.worker_state.starting = False
            if self._presence is not None:
                role = self._roles.describe() if self._roles is not None else None
                self._presence.set(Phase.ready, message=role)
            log.info("worker %s: start-up done", self.name)
            return
        except BaseException as exc:
            self._startup = None
            if self.worker_state is not None:
                self.worker_state.starting = False
            self.startup_error = exc
            log.error("worker %s: start-up failed", self.name, exc_info=exc)
            raise StopRequested() from exc
        self.heartbeat()
        if self._presence is not None:
            self._presence.set(Phase.statistics, progress=fraction, message=message)


def worker_name(model: str) -> str:
    return f"memedit-{model}-{socket.gethostname()}-{os.getpid()}"


def main(name: str, *, burst: bool = False, presence: Presence | None = None) -> None:
    """Entry point of ``memedit worker``. ``presence``: the record the CLI published
    before importing this module (one is made here otherwise)."""
    from workers import startup  # noqa: PLC0415

    settings = get_settings()
    own_presence = presence is None
    if presence is None:
        presence = Presence(
            command_client(settings.redis_url), settings.queue_prefix, name, worker_name(name)
        )
        presence.set(Phase.loading, message="loading the model")
        presence.start()
    try:
        state = load_state(name, settings)
        presence.version = lambda: state.runtime.current_version
        presence.set(Phase.loading, message="registered; preparing")
        # reads between start-up steps see the head only if the weights are it already
        reads_ok = state.runtime.current_version == startup.ledger_head(state)
        conn: Redis = worker_client(settings.redis_url)
        queues = [
            Queue(settings.read_queue(name), connection=conn),
            Queue(settings.edit_queue(name), connection=conn),
            Queue(settings.eval_queue(name), connection=conn),
        ]
        # one writer per model (the lease); the writer puts back what the previous one
        # left and runs the reconciler (workers/roles.py, workers/reconciler.py)
        roles = Roles(
            WriterLease(state.engine, state.model_id),
            read_queue=queues[0],
            writer_queues=queues,
            replica_queues=[queues[0], queues[2]],
            reconciler=Reconciler(
                settings, name, state.model_id, state.engine, command_client(settings.redis_url)
            ),
            take_over=lambda: startup.requeue_unfinished(state, queues[1]),
            presence=presence,
        )

        def steps() -> Steps[None]:
            head = yield from startup_steps(state)
            role = "writer" if roles.check(worker) else "replica"
            log.info("worker for %s ready at version %s (%s)", name, head, role)

        worker = StartingWorker(
            queues,
            startup=steps(),
            read_queue=queues[0],
            reads_ok=reads_ok,
            presence=presence,
            state=state,
            roles=roles,
            connection=conn,
            name=presence.name,
            worker_ttl=WORKER_TTL_S,
        )
        try:
            worker.work(burst=burst, logging_level=logging.getLevelName(log.getEffectiveLevel()))
        finally:
            roles.stop()
        if worker.startup_error is not None:
            raise RuntimeError(f"the worker for {name} could not start") from worker.startup_error
    finally:
        if own_presence:
            presence.stop()
