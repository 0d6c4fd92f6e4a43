"""A model's worker at start: its ledger rows, its version, its unfinished jobs, and
the caches its edits need (called by :mod:`workers.worker` and the jobs). All
reading and writing of the ledger goes through :mod:`service.ledger`.

- :func:`register` makes sure the model and its base version exist in the ledger and
  that the loaded weights are that base;
- :func:`sync_to_head` brings the in-memory model to the ledger's head;
- :func:`requeue_unfinished` puts back the jobs a stopped worker left unfinished;
- :func:`warm_steps` computes the key statistics and the editors' per-layer caches
  before the first edit, in steps (the worker answers reads in between).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from rq import Queue
from sqlalchemy.exc import IntegrityError as DbIntegrityError

from service import VERSION, queue
from service.artifacts import ArtifactError
from service.ledger import jobs as ledger_jobs
from service.ledger import models as ledger_models
from service.ledger import versions as ledger_versions
from service.ledger.sessions import get_engine, session_scope
from service.ledger.tables import ArtifactKind, JobKind, JobStatus
from service.settings import ModelSpec, Settings
from workers.editing.common.base import EditError
from workers.editing.common.stats import Steps, stats_provider
from workers.editing.hparams import METHODS, defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditContext
from workers.models.profiles import d_mlp, profile_for
from workers.runtime import ModelRuntime
from workers.state import WorkerState

log = logging.getLogger(__name__)

# recorded in every version row (info.code_version)
CODE_VERSION = VERSION


# -- model registration and sync ------------------------------------------------------


def register(runtime: ModelRuntime, name: str, spec: ModelSpec, settings: Settings) -> int:
    """Make sure the model's row and its base version (0) exist and that the loaded
    weights are that base (:func:`service.ledger.models.register_base`); returns the
    model's ledger id. Retries when another worker registers it at the same time."""
    base = runtime.base_hashes()
    model_type = runtime.model.config.model_type
    engine = get_engine(settings.database_url)
    for _attempt in range(3):
        try:
            with session_scope(engine) as s:
                return ledger_models.register_base(
                    s,
                    name,
                    spec,
                    model_type=model_type,
                    base_hashes=base,
                    code_version=CODE_VERSION,
                )
        except DbIntegrityError:
            log.info("another worker registered %s at the same time; retrying", name)
    raise RuntimeError(f"could not register model {name!r}")


def ledger_head(state: WorkerState) -> int:
    """The model's head version in the ledger now."""
    with state.ledger() as s:
        return ledger_versions.head_number(s, state.model_id)


def sync_to_head(state: WorkerState) -> int:
    """Bring the in-memory model to the ledger's head version (no-op when there)."""
    with state.ledger() as s:
        head = ledger_versions.head_number(s, state.model_id)
        if state.runtime.current_version == head:
            return head
        records = ledger_versions.version_records(s, state.model_id)
    t0 = time.perf_counter()
    state.runtime.sync(records, head, state.store)
    log.info("synced %s to version %d in %.2f s", state.name, head, time.perf_counter() - t0)
    return head


def sync_to(state: WorkerState, version: int | None) -> int:
    """Bring the in-memory model to ``version`` (None: the ledger's head), rebuilt
    from the ledger's records and hash-checked; returns the version it is at."""
    if version is None:
        return sync_to_head(state)
    if state.runtime.current_version != version:
        with state.ledger() as s:
            records = ledger_versions.version_records(s, state.model_id)
        state.runtime.sync(records, version, state.store)
    return version


def requeue_unfinished(state: WorkerState, edits: Queue) -> int:
    """Put back this model's ledger jobs that are not finished: a lost Redis message,
    or a worker that died mid-job (its own job and the jobs it had taken into its
    batches are left ``running``). Postgres is the truth.

    Every unfinished job becomes ``queued`` again (its applied edits stay applied;
    the queued ones run again), except an evaluation that a live replica still runs
    (:func:`service.ledger.jobs.running_elsewhere`), and is re-enqueued unless Redis still holds its
    entry (:func:`service.queue.enqueue_job`, as the API does). Call it when the
    model's writer starts, before it takes jobs. Returns how many jobs were put back.
    """
    n = 0
    conn = edits.connection
    with state.ledger() as s:
        for job in ledger_jobs.unfinished_jobs(s, state.model_id):
            if ledger_jobs.running_elsewhere(s, job):
                continue  # an evaluation a live replica runs
            status = queue.entry_status(conn, job.id)
            was_running = job.status is JobStatus.running
            if was_running:
                # a job run or claimed by a worker that stopped; a queued rq entry
                # would otherwise find it running and do nothing
                ledger_jobs.put_back(s, job, "put back in the queue: the worker running it stopped")
            if status in ("queued", "deferred", "scheduled"):
                n += was_running
                continue
            if status is not None:
                queue.drop_entry(conn, job.id)
            ledger_jobs.put_back(s, job, "re-enqueued from the ledger")
            name = state.settings.eval_queue(state.name) if job.kind is JobKind.evaluation else None
            queue.enqueue_job(conn, state.settings, state.name, job.id, queue_name=name)
            n += 1
    if n:
        log.info("put back %d unfinished jobs of %s from the ledger", n, state.name)
    return n


# -- caches for the edits ---------------------------------------------------------------


def resolve_hparams(state: WorkerState, method: str, overrides: dict[str, Any] | None) -> Any:
    """The method's defaults for this model's architecture, with the job's overrides."""
    rt = state.runtime
    cfg = rt.model.config
    base = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, d_mlp(rt.model))
    return with_overrides(base, overrides)


def stats_provider_for(
    state: WorkerState, hparams: Any, progress: Callable[[float, str], None] | None = None
) -> Callable[[str], Any]:
    """Second moments of the edited layers' keys, cached per base model.

    The worker computes the default layers' statistics at start-up on the base
    weights (``warm_statistics``); other layers are computed on first use.
    """
    rt = state.runtime
    profile = profile_for(rt.model)
    inner = stats_provider(
        state.stats,
        rt.model,
        rt.tokenizer,
        [profile.mlp_out_param(layer) for layer in hparams.layers],
        hparams.mom2_dataset,
        hparams.mom2_n_samples,
        hparams.mom2_sample_tokens,
        progress=progress,
    )

    def provide(param: str) -> Any:
        with rt.at_base():  # statistics are the base model's, whatever the version
            return inner(param)

    return provide


def templates_provider_for(state: WorkerState) -> Callable[[Any, int], list[str]]:
    """The context templates of the base weights, so that an edit depends only on the
    base and the requests before it: from this machine's cache, else from the ledger
    (an artifact of kind ``templates`` that another worker of the base stored), else
    sampled from the base weights and stored in the ledger for every other worker."""
    rt = state.runtime

    def provide(spec: Any, seed: int) -> list[str]:
        found = state.templates.get(spec, seed)
        if found is not None:
            return found
        with state.ledger() as s:
            row = ledger_versions.templates_artifact(s, state.base_fingerprint, spec, seed)
            if row is not None:
                stored = json.loads(state.store.get(row.path, row.sha256))["templates"]
                state.templates.put(spec, seed, stored)
                return list(stored)
        with rt.at_base():
            templates = state.templates.get_or_generate(rt.model, rt.tokenizer, spec, seed)
        meta = {"fingerprint": state.base_fingerprint, "spec": [list(p) for p in spec],
                "seed": seed}  # fmt: skip
        data = json.dumps({**meta, "templates": templates}, sort_keys=True).encode()
        with state.ledger() as s:
            put = state.store.put(ArtifactKind.templates.value, data)
            ledger_versions.add_artifact(s, ArtifactKind.templates, put, meta)
        return templates

    return provide


class LedgerStats:
    """The statistics every worker of a base shares (:class:`SharedStats`): files of
    kind ``stats`` in the artifact store, named in the ledger by their key. A file
    the ledger names but this machine's store lacks (another machine's store) is
    computed here again."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def fetch(self, key: Mapping[str, str]) -> bytes | None:
        with self.state.ledger() as s:
            row = ledger_versions.stats_artifact(s, key)
            if row is None:
                return None
            path, sha = row.path, row.sha256
        try:
            return self.state.store.get(path, sha)
        except ArtifactError as exc:
            log.warning("the ledger names statistics %s, but they cannot be read: %s", path, exc)
            return None

    def publish(self, key: Mapping[str, str], data: bytes) -> None:
        with self.state.ledger() as s:
            if ledger_versions.stats_artifact(s, key) is None:
                put = self.state.store.put(ArtifactKind.stats.value, data)
                ledger_versions.add_artifact(s, ArtifactKind.stats, put, key)


# the share of start-up progress given to the statistics; the editors' caches take the rest
_STATISTICS_SHARE = 0.95


def warm_steps(state: WorkerState) -> Steps[None]:
    """Compute (or load) the statistics every method's defaults need, before the
    model moves away from its base weights, then let every editor that can build its
    per-layer caches for its defaults (MEMIT/EMMET: factorisations of C; AlphaEdit:
    the null-space bases), so that the first edit of each method costs what later
    ones do. In steps (a batch of the statistics corpus, or one editor); yields
    ``(fraction, message)``."""
    # one pass per corpus over the union of the layers the methods' defaults edit
    wanted: dict[tuple[str, int, int], set[int]] = {}
    for method in METHODS:
        hp = resolve_hparams(state, method, None)
        if get_editor(method).uses_statistics and hp.mom2_adjustment:
            key = (hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens)
            wanted.setdefault(key, set()).update(hp.layers)
    profile = profile_for(state.runtime.model)
    passes = max(1, len(wanted))
    last = -1.0
    for i, ((corpus, n_samples, sample_tokens), layers) in enumerate(wanted.items()):
        steps = state.stats.steps(
            state.runtime.model,
            state.runtime.tokenizer,
            [profile.mlp_out_param(layer) for layer in sorted(layers)],
            corpus,
            n_samples,
            sample_tokens,
        )
        for fraction, message in steps:
            if fraction - last >= 0.1 or fraction >= 1.0:
                last = fraction
                log.info("statistics for %s: %.0f%% (%s)", state.name, 100 * fraction, message)
            yield _STATISTICS_SHARE * (i + fraction) / passes, f"statistics: {message}"
        last = -1.0
    seconds: dict[str, float] = {}
    preparing = [m for m in METHODS if get_editor(m).prepares]
    for j, method in enumerate(preparing):
        yield (
            _STATISTICS_SHARE + (1 - _STATISTICS_SHARE) * j / len(preparing),
            f"preparing the {method} editor",
        )
        elapsed = _prepare_editor(state, method)
        if elapsed is not None:
            seconds[method] = elapsed
    log.info("editor caches for %s built: %s", state.name, seconds)


def _prepare_editor(state: WorkerState, method: str) -> float | None:
    """Build ``method``'s per-layer caches for its defaults; seconds taken, or None
    when its defaults do not fit this model."""
    rt = state.runtime
    hp = resolve_hparams(state, method, None)
    t0 = time.perf_counter()
    ctx = EditContext(
        device=state.settings.device,
        cache=state.editor_cache,
        stats_provider=stats_provider_for(state, hp),
        state=rt.method_state(),
        templates_provider=templates_provider_for(state),
    )
    try:
        get_editor(method).prepare(rt.model, hp, ctx)
    except EditError as exc:
        # the method's defaults do not fit this model (e.g. no null space for
        # AlphaEdit): its edits will fail with this reason, the others still work
        log.warning("%s cannot prepare %s with its defaults: %s", state.name, method, exc)
        return None
    return round(time.perf_counter() - t0, 3)
