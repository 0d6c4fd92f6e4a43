"""A model's writer at start: its ledger rows, its version, its unfinished jobs,
and the caches its edits need (called by :mod:`workers.worker` and the jobs).

- :func:`register_model` makes sure the model and its base version exist in the
  ledger and that the loaded weights are that base;
- :func:`sync_to_head` brings the in-memory model to the ledger's head;
- :func:`requeue_unfinished` puts back the jobs a stopped worker left unfinished;
- :func:`warm_steps` computes the key statistics and the editors' per-layer caches
  before the first edit, in steps (the worker answers reads in between);
- :func:`version_records` and :func:`chain` read the version tree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.job import JobStatus as RqStatus
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session

from service import VERSION
from service.db import get_engine, session_scope
from service.models import (
    Artifact,
    Evaluation,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
    VersionKind,
)
from workers.editing.common.base import EditError
from workers.editing.common.stats import StatsCache, Steps, stats_provider
from workers.editing.hparams import METHODS, defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditContext
from workers.models.loading import weights_fingerprint
from workers.models.profiles import d_mlp, profile_for
from workers.runtime import IntegrityError, VersionRecord
from workers.worker import WorkerState

log = logging.getLogger(__name__)

CODE_VERSION = VERSION  # recorded in every version row (info.code_version)


def _engine(state: WorkerState):  # noqa: ANN202
    return get_engine(state.settings.database_url)


# -- model registration and sync ------------------------------------------------------


def register_model(state: WorkerState) -> int:
    """Make sure the model's row and its base version (0) exist; check the base weights.

    Version 0 records the sha256 of every tensor of the pristine model. A worker
    whose loaded weights differ (another checkpoint under the same name) refuses
    to serve rather than replay deltas onto the wrong base.
    """
    base = state.runtime.base_hashes()
    model_type = state.runtime.model.config.model_type
    for _attempt in range(3):
        try:
            with session_scope(_engine(state)) as s:
                model = s.scalar(select(Model).where(Model.name == state.name))
                if model is None:
                    model = Model(
                        name=state.name,
                        source=state.spec.source,
                        policy={"evaluations": state.spec.initial_evaluations()},
                    )
                    s.add(model)
                    s.flush()
                model.architecture = model_type
                model.policy = {**(model.policy or {}), **state.spec.policy()}
                v0 = s.scalar(
                    select(Version)
                    .where(Version.model_id == model.id, Version.number == 0)
                    .with_for_update()
                )
                if v0 is None:
                    s.add(
                        Version(
                            model_id=model.id,
                            number=0,
                            kind=VersionKind.base,
                            tensor_sha256=base,
                            info={"source": state.spec.source, "code_version": CODE_VERSION},
                        )
                    )
                elif not v0.tensor_sha256:
                    # the API wrote version 0 when it first saw the model configured
                    # (ledger.sync_models); the first worker to load it records its hashes
                    v0.tensor_sha256 = base
                    v0.info = {
                        **(v0.info or {}),
                        "source": state.spec.source,
                        "code_version": CODE_VERSION,
                    }
                elif v0.tensor_sha256 != base:
                    differing = sorted(k for k in base if v0.tensor_sha256.get(k) != base[k])
                    raise IntegrityError(
                        f"the weights loaded for {state.name!r} differ from the ledger's base "
                        f"version in {len(differing)} tensors (first: {differing[:3]}); "
                        "refusing to serve"
                    )
                return model.id
        except DbIntegrityError:
            log.info("another worker registered %s at the same time; retrying", state.name)
    raise RuntimeError(f"could not register model {state.name!r}")


def version_records(s: Session, model_id: int) -> dict[int, VersionRecord]:
    rows = s.scalars(select(Version).where(Version.model_id == model_id)).all()
    artifacts = {
        a.id: a
        for a in s.scalars(
            select(Artifact).where(
                Artifact.id.in_(
                    [r.delta_artifact_id for r in rows if r.delta_artifact_id]
                    + [r.snapshot_artifact_id for r in rows if r.snapshot_artifact_id]
                )
            )
        )
    }
    out: dict[int, VersionRecord] = {}
    for r in rows:
        delta = artifacts.get(r.delta_artifact_id) if r.delta_artifact_id else None
        snap = artifacts.get(r.snapshot_artifact_id) if r.snapshot_artifact_id else None
        out[r.number] = VersionRecord(
            number=r.number,
            kind=r.kind.value,
            parent_number=r.parent_number,
            delta_path=delta.path if delta else None,
            delta_sha256=delta.sha256 if delta else None,
            snapshot_path=snap.path if snap else None,
            snapshot_sha256=snap.sha256 if snap else None,
            tensor_sha256=dict(r.tensor_sha256 or {}),
        )
    return out


def head_number(s: Session, model_id: int) -> int:
    return int(s.scalar(select(func.max(Version.number)).where(Version.model_id == model_id)))


def ledger_head(state: WorkerState) -> int:
    """The model's head version in the ledger now."""
    with session_scope(_engine(state)) as s:
        return head_number(s, state.model_id)


def sync_to_head(state: WorkerState) -> int:
    """Bring the in-memory model to the ledger's head version (no-op when there)."""
    with session_scope(_engine(state)) as s:
        head = head_number(s, state.model_id)
        if state.runtime.current_version == head:
            return head
        records = version_records(s, state.model_id)
    t0 = time.perf_counter()
    state.runtime.sync(records, head, state.store)
    log.info("synced %s to version %d in %.2f s", state.name, head, time.perf_counter() - t0)
    return head


def requeue_unfinished(state: WorkerState, queue: Queue) -> int:
    """Put back this model's ledger jobs that are not finished: a lost Redis message,
    or a worker that died mid-job (its own job and the jobs it had taken into its
    batches are left ``running``). Postgres is the truth.

    Every unfinished job becomes ``queued`` again (its applied edits stay applied;
    the queued ones run again) and is re-enqueued unless Redis still holds its
    entry. Call it when the model's writer starts, before it takes jobs. Returns
    how many jobs were put back.
    """
    n = 0
    # evaluation jobs go back to their own queue, served after the edits
    evals = Queue(state.settings.eval_queue(state.name), connection=queue.connection)
    with session_scope(_engine(state)) as s:
        pending = s.scalars(
            select(Job)
            .where(
                Job.model_id == state.model_id,
                Job.status.in_([JobStatus.queued, JobStatus.running]),
            )
            .order_by(Job.created_at)
        ).all()
        for job in pending:
            try:
                status = RqJob.fetch(job.id, connection=queue.connection).get_status()
            except NoSuchJobError:
                status = None
            was_running = job.status is JobStatus.running
            if was_running:
                # a job run or claimed by a worker that stopped; a queued rq entry
                # would otherwise find it running and do nothing
                job.status = JobStatus.queued
                job.message = "put back in the queue: the worker running it stopped"
                if job.kind is JobKind.evaluation:
                    s.execute(
                        update(Evaluation)
                        .where(Evaluation.job_id == job.id)
                        .values(status=JobStatus.queued)
                    )
            if status in (RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED):
                n += was_running
                continue
            if status is not None:
                RqJob.fetch(job.id, connection=queue.connection).delete()
            job.status = JobStatus.queued
            job.message = "re-enqueued from the ledger"
            (evals if job.kind is JobKind.evaluation else queue).enqueue(
                "workers.jobs.run_job",
                job.id,
                job_id=job.id,
                job_timeout=state.settings.job_timeout_s,
            )
            n += 1
    if n:
        log.info("put back %d unfinished jobs of %s from the ledger", n, state.name)
    return n


# -- the version tree -------------------------------------------------------------------


def chain(records: dict[int, VersionRecord], n: int) -> set[int]:
    """The version numbers from ``n`` back to the base (``n`` included)."""
    seen: set[int] = set()
    cur: int | None = n
    while cur is not None and cur not in seen:
        seen.add(cur)
        cur = records[cur].parent_number
    return seen


# -- caches for the edits ---------------------------------------------------------------


def resolve_hparams(state: WorkerState, method: str, overrides: dict[str, Any] | None) -> Any:
    """The method's defaults for this model's architecture, with the job's overrides."""
    rt = state.runtime
    cfg = rt.model.config
    base = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, d_mlp(rt.model))
    return with_overrides(base, overrides)


def stats_cache(state: WorkerState) -> StatsCache:
    cache = state.cache.get("stats_cache")
    if cache is None:
        # on the base weights: the worker builds this before it syncs to the head
        fingerprint = state.cache.setdefault(
            "base_fingerprint", weights_fingerprint(state.runtime.model)
        )
        cache = StatsCache(state.settings.effective_cache_dir / "stats", fingerprint)
        state.cache["stats_cache"] = cache
    return cache


def stats_provider_for(
    state: WorkerState, hparams: Any, progress: Callable[[float, str], None] | None = None
) -> Callable[[str], Any]:
    """Second moments of the edited layers' keys, cached per base model.

    The worker computes the default layers' statistics at start-up on the base
    weights (``warm_statistics``); other layers are computed on first use.
    """
    rt = state.runtime
    profile = profile_for(rt.model)
    return stats_provider(
        stats_cache(state),
        rt.model,
        rt.tokenizer,
        [profile.mlp_out_param(layer) for layer in hparams.layers],
        hparams.mom2_dataset,
        hparams.mom2_n_samples,
        hparams.mom2_sample_tokens,
        progress=progress,
    )


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
        steps = stats_cache(state).steps(
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
        cache=state.cache,
        stats_provider=stats_provider_for(state, hp),
        state=rt.method_state(),
    )
    try:
        get_editor(method).prepare(rt.model, hp, ctx)
    except EditError as exc:
        # the method's defaults do not fit this model (e.g. no null space for
        # AlphaEdit): its edits will fail with this reason, the others still work
        log.warning("%s cannot prepare %s with its defaults: %s", state.name, method, exc)
        return None
    return round(time.perf_counter() - t0, 3)
