"""What a worker holds while it serves a model: :class:`WorkerState`, built once at
start-up (:func:`workers.worker.load_state`) and handed to every job explicitly
(:mod:`workers.worker` passes it to job functions marked :func:`needs_state`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.artifacts import ArtifactStore
from service.ledger.sessions import get_engine, session_scope
from service.settings import ModelSpec, Settings
from workers.editing.common.stats import StatsCache
from workers.editing.common.templates import TemplateCache
from workers.evaluation.canary import CanaryCache
from workers.runtime import ModelRuntime

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class WorkerState:
    """One model in one worker process.

    - ``runtime``: the loaded model, at a ledger version;
    - ``store``: the artifact store (deltas, snapshots);
    - ``model_id``: the model's ledger row;
    - ``stats``: the layer statistics, cached per base fingerprint (computed on the
      base weights: ``base_fingerprint`` is taken before any edit is replayed);
    - ``templates``: the context templates, sampled from the base weights once
      (kept on disk beside the statistics);
    - ``editor_cache``: the editing library's own caches (``EditContext.cache``:
      context templates, factorisations of the statistics), alive as long as the model;
    - ``canary``: the guard's canary of the current version (None with the guard off);
    - ``starting``: the start-up's steps are still running (:class:`workers.worker.StartingWorker`).
    """

    name: str
    spec: ModelSpec
    settings: Settings
    runtime: ModelRuntime
    store: ArtifactStore
    model_id: int
    stats: StatsCache
    base_fingerprint: str
    templates: TemplateCache
    editor_cache: dict[str, Any] = field(default_factory=dict)
    canary: CanaryCache | None = None
    # while the start-up's steps run (statistics on the base weights), a read between
    # two steps is answered only at the version the weights are at
    starting: bool = False

    @property
    def engine(self) -> Engine:
        return get_engine(self.settings.database_url)

    @contextmanager
    def ledger(self) -> Iterator[Session]:
        """A ledger session whose transaction commits when the block ends."""
        with session_scope(self.engine) as session:
            yield session


def needs_state(fn: Callable[P, R]) -> Callable[P, R]:
    """Mark a job function that takes the worker's state as its first argument: the
    worker (:class:`workers.worker.StateJob`) passes it; the queue carries only the
    other arguments."""
    fn.__memedit_state__ = True  # type: ignore[attr-defined]
    return fn
