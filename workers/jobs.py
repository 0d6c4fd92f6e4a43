"""Job functions the rq worker runs, by dotted path (``workers.jobs.run_job``).

The ledger is the truth: a job reads its input from Postgres, measures and computes
with the in-memory model, writes the artifacts, commits the new version in one
transaction and only then lets the in-memory model move to it. If anything fails
before the commit, the model is restored exactly (``discard``), the job and its
unapplied edits are marked failed with the reason, and the exception is re-raised
so that rq records it too. A job whose ledger row is already finished does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.job import JobStatus as RqStatus
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session

from service.db import get_engine, session_scope
from service.hparams import METHODS, defaults_for, with_overrides
from service.models import (
    Artifact,
    ArtifactKind,
    Edit,
    EditStatus,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
    VersionKind,
)
from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest, WeightDelta
from workers.evaluation.scoring import counterfact_scores, target_logprobs
from workers.evaluation.scoring import generate as greedy_generate
from workers.models.loading import weights_fingerprint
from workers.models.profiles import profile_for
from workers.runtime import IntegrityError, VersionRecord
from workers.worker import WorkerState, current_state

log = logging.getLogger(__name__)

CODE_VERSION = "0.1.0"


def _now() -> datetime:
    return datetime.now(UTC)


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
                    model = Model(name=state.name, source=state.spec.source, policy={})
                    s.add(model)
                    s.flush()
                model.architecture = model_type
                model.policy = {**(model.policy or {}), "snapshot_every": state.spec.snapshot_every}
                v0 = s.scalar(
                    select(Version).where(Version.model_id == model.id, Version.number == 0)
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


def _head(s: Session, model_id: int) -> int:
    return int(s.scalar(select(func.max(Version.number)).where(Version.model_id == model_id)))


def sync_to_head(state: WorkerState) -> int:
    """Bring the in-memory model to the ledger's head version (no-op when there)."""
    with session_scope(_engine(state)) as s:
        head = _head(s, state.model_id)
        if state.runtime.current_version == head:
            return head
        records = version_records(s, state.model_id)
    t0 = time.perf_counter()
    state.runtime.sync(records, head, state.store)
    log.info("synced %s to version %d in %.2f s", state.name, head, time.perf_counter() - t0)
    return head


def requeue_unfinished(state: WorkerState, queue: Queue) -> int:
    """Re-enqueue this model's ledger jobs that are not finished but not in Redis
    (a lost message, a worker that died mid-job). Postgres is the truth."""
    n = 0
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
            if status in (RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED):
                continue
            if status is not None:
                RqJob.fetch(job.id, connection=queue.connection).delete()
            job.status = JobStatus.queued
            job.message = "re-enqueued from the ledger"
            queue.enqueue(
                "workers.jobs.run_job",
                job.id,
                job_id=job.id,
                job_timeout=state.settings.job_timeout_s,
            )
            n += 1
    if n:
        log.info("re-enqueued %d unfinished jobs of %s from the ledger", n, state.name)
    return n


# -- job entry points -----------------------------------------------------------------


def run_job(job_id: str) -> dict[str, Any] | None:
    """Run an edit or rollback job from the ledger."""
    state = current_state()
    engine = _engine(state)
    with session_scope(engine) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LookupError(f"job {job_id} is not in the ledger")
        if job.status in (JobStatus.succeeded, JobStatus.failed):
            log.info("job %s is already %s; nothing to do", job_id, job.status.value)
            return job.result
        if job.model_id != state.model_id:
            raise RuntimeError(f"job {job_id} belongs to another model")
        job.status = JobStatus.running
        job.started_at = job.started_at or _now()
        kind = job.kind
    log.info("job %s (%s) started", job_id, kind.value)
    try:
        sync_to_head(state)
        result = _run_edit(state, job_id) if kind is JobKind.edit else _run_rollback(state, job_id)
    except Exception as exc:
        _fail(state, job_id, exc)
        raise
    with session_scope(engine) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.succeeded,
                progress=1.0,
                result=result,
                finished_at=_now(),
                message=None,
            )
        )
    log.info("job %s succeeded: %s", job_id, result.get("versions"))
    return result


def score(model: str, prompts: list[str], targets: list[str]) -> dict[str, Any]:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at head."""
    state = _state_for(model)
    version = sync_to_head(state)
    rt = state.runtime
    logprobs = target_logprobs(rt.model, rt.tokenizer, prompts, targets)
    return {"logprobs": [float(x) for x in logprobs], "version": version}


def generate(model: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` at head."""
    state = _state_for(model)
    version = sync_to_head(state)
    rt = state.runtime
    return {
        "text": greedy_generate(rt.model, rt.tokenizer, prompt, max_new_tokens),
        "version": version,
    }


def _state_for(model: str) -> WorkerState:
    state = current_state()
    if model != state.name:
        raise RuntimeError(f"this worker serves {state.name!r}, not {model!r}")
    return state


# -- edit jobs ------------------------------------------------------------------------


def _progress(state: WorkerState, job_id: str, fraction: float, message: str) -> None:
    with session_scope(_engine(state)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(progress=max(0.0, min(1.0, fraction)), message=message[:500])
        )


def _request_of(e: Edit) -> EditRequest:
    return EditRequest(
        prompt=e.prompt,
        subject=e.subject,
        target_new=e.target_new,
        target_true=e.target_true,
        paraphrase_prompts=tuple(e.paraphrase_prompts or ()),
        neighborhood_prompts=tuple(e.neighborhood_prompts or ()),
    )


def _measure(state: WorkerState, requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    rt = state.runtime
    return [counterfact_scores(rt.model, rt.tokenizer, r) for r in requests]


def _with_target_true(state: WorkerState, req: EditRequest) -> tuple[EditRequest, bool]:
    """Metrics compare target_new with the true object. Without one, use what the
    unedited model says (its greedy continuation's first word) and flag it."""
    if req.target_true:
        return req, False
    rt = state.runtime
    text = greedy_generate(rt.model, rt.tokenizer, req.text, 6).strip()
    word = text.split()[0].strip(".,;:!?\"'()") if text.split() else ""
    from dataclasses import replace  # noqa: PLC0415

    return replace(req, target_true=word or "the"), True


def resolve_hparams(state: WorkerState, method: str, overrides: dict[str, Any] | None) -> Any:
    """The method's defaults for this model's architecture, with the job's overrides."""
    rt = state.runtime
    cfg = rt.model.config
    base = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, _d_mlp(rt.model))
    return with_overrides(base, overrides)


def _d_mlp(model: Any) -> int:
    profile = profile_for(model)
    shape = model.get_parameter(profile.mlp_out_param(0)).shape
    return int(shape[0] if profile.transposed else shape[1])


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


def warm_statistics(state: WorkerState) -> None:
    """Compute (or load) the statistics every method's defaults need, before the
    model moves away from its base weights."""
    last = [-1.0]

    def report(fraction: float, message: str) -> None:
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            log.info("statistics for %s: %.0f%% (%s)", state.name, 100 * fraction, message)

    # one pass per corpus over the union of the layers the methods' defaults edit
    wanted: dict[tuple[str, int, int], set[int]] = {}
    for method in METHODS:
        hp = resolve_hparams(state, method, None)
        if getattr(hp, "mom2_adjustment", False):
            key = (hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens)
            wanted.setdefault(key, set()).update(hp.layers)
    profile = profile_for(state.runtime.model)
    for (corpus, n_samples, sample_tokens), layers in wanted.items():
        stats_cache(state).get_or_compute(
            state.runtime.model,
            state.runtime.tokenizer,
            [profile.mlp_out_param(layer) for layer in sorted(layers)],
            corpus,
            n_samples,
            sample_tokens,
            progress=report,
        )


def _run_edit(state: WorkerState, job_id: str) -> dict[str, Any]:

    engine = _engine(state)
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        method = job.payload["method"]
        overrides = job.payload.get("hparams") or {}
        all_edits = list(job.edits)
        pending = [e for e in all_edits if e.status is EditStatus.queued]
        previous = (job.result or {}) if job.result else {}
    editor = get_editor(method)
    hparams = resolve_hparams(state, method, overrides)
    groups = _groups(editor, pending)
    versions: list[int] = list(previous.get("versions", []))
    metrics: dict[str, Any] = dict(previous.get("metrics", {}))
    for gi, group in enumerate(groups):
        base_fraction = gi / len(groups)

        def report(fraction: float, message: str, _b: float = base_fraction) -> None:
            _progress(state, job_id, _b + fraction / len(groups), message)

        number, group_metrics = _apply_group(state, job_id, editor, method, hparams, group, report)
        versions.append(number)
        metrics.update(group_metrics)
    return {"versions": versions, "metrics": metrics, "method": method}


def _groups(editor: Any, edits: list[Edit]) -> list[list[Edit]]:
    size = getattr(editor, "max_requests_per_delta", None) or len(edits) or 1
    return [edits[i : i + size] for i in range(0, len(edits), size)]


def _apply_group(
    state: WorkerState,
    job_id: str,
    editor: Any,
    method: str,
    hparams: Any,
    group: list[Edit],
    report: Any,
) -> tuple[int, dict[str, Any]]:
    rt = state.runtime
    t_start = time.perf_counter()
    requests = [_request_of(e) for e in group]
    scored: list[EditRequest] = []
    inferred: list[str | None] = []  # the target_true used when the client gave none
    for r in requests:
        r2, was_inferred = _with_target_true(state, r)
        scored.append(r2)
        inferred.append(r2.target_true if was_inferred else None)
    report(0.0, f"measuring {len(group)} facts before the edit")
    before = _measure(state, scored)
    ctx = EditContext(
        device=state.settings.device,
        cache=state.cache,
        stats_provider=(
            stats_provider_for(state, hparams, lambda f, m: report(0.1, m))
            if hasattr(hparams, "mom2_dataset")
            else None
        ),
        progress=lambda f, m: report(0.1 + 0.7 * f, m),
        state=rt.method_state(),
    )
    t0 = time.perf_counter()
    delta: WeightDelta = editor.compute_delta(rt.model, rt.tokenizer, requests, hparams, ctx)
    t_compute = time.perf_counter() - t0
    if not delta.is_finite():
        raise ValueError("the computed update is not finite; nothing was applied")
    staged = rt.stage(delta)
    try:
        report(0.85, "measuring after the edit")
        t1 = time.perf_counter()
        after = _measure(state, scored)
        t_eval = time.perf_counter() - t1
        number, metrics = _commit_edit_version(
            state,
            job_id,
            method,
            hparams,
            group,
            staged,
            delta,
            before,
            after,
            inferred,
            timing={"compute_s": t_compute, "evaluate_s": t_eval},
            t_start=t_start,
        )
    except BaseException:
        rt.discard(staged)
        raise
    rt.commit(staged, number)
    return number, metrics


def _metrics_row(
    before: dict[str, Any], after: dict[str, Any], inferred_true: str | None
) -> dict[str, Any]:
    row: dict[str, Any] = dict(after)
    for key, value in before.items():
        row[f"pre_{key}"] = value
    if inferred_true is not None:
        row["target_true_inferred"] = inferred_true
    return row


def _commit_edit_version(
    state: WorkerState,
    job_id: str,
    method: str,
    hparams: Any,
    group: list[Edit],
    staged: Any,
    delta: WeightDelta,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    inferred: list[str | None],
    timing: dict[str, float],
    t_start: float,
) -> tuple[int, dict[str, Any]]:
    rt = state.runtime
    delta_blob = delta.to_bytes()
    stored_delta = state.store.put("delta", delta_blob)
    engine = _engine(state)
    with session_scope(engine) as s:
        number = _head(s, state.model_id) + 1
        if number - 1 != rt.current_version:
            raise RuntimeError(
                f"the ledger moved to version {number - 1} while this edit was computed "
                f"on version {rt.current_version}"
            )
        snapshot_id = None
        if number % state.spec.snapshot_every == 0:
            snap = state.store.put("snapshot", staged.snapshot_bytes())
            snapshot_id = _artifact(s, ArtifactKind.snapshot, snap, {"version": number}).id
        delta_row = _artifact(s, ArtifactKind.delta, stored_delta, {"method": method})
        timing = {**timing, "total_s": time.perf_counter() - t_start}
        version = Version(
            model_id=state.model_id,
            number=number,
            kind=VersionKind.edit,
            parent_number=number - 1,
            job_id=job_id,
            method=method,
            hparams=hparams.model_dump(mode="json"),
            delta_artifact_id=delta_row.id,
            snapshot_artifact_id=snapshot_id,
            tensor_sha256=staged.tensor_sha256,
            drift=staged.drift,
            update_norm=staged.update_norm,
            timing=timing,
            info={
                "code_version": CODE_VERSION,
                "source": state.spec.source,
                "drift_relative": staged.drift_relative,
                "delta_meta": delta.meta,
            },
        )
        s.add(version)
        s.flush()
        metrics: dict[str, Any] = {}
        for e, b, a, inf in zip(group, before, after, inferred, strict=True):
            row = _metrics_row(b, a, inf)
            s.execute(
                update(Edit)
                .where(Edit.id == e.id)
                .values(status=EditStatus.applied, version_id=version.id, metrics=row, reason=None)
            )
            metrics[str(e.id)] = row
        job = s.get(Job, job_id)
        assert job is not None
        job.result = {
            "versions": [*((job.result or {}).get("versions", [])), number],
            "metrics": {**((job.result or {}).get("metrics", {})), **metrics},
            "method": method,
        }
    return number, metrics


def _artifact(s: Session, kind: ArtifactKind, stored: Any, meta: dict[str, Any]) -> Artifact:
    row = s.scalar(select(Artifact).where(Artifact.path == stored.path))
    if row is None:
        row = Artifact(
            kind=kind,
            path=stored.path,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            meta=meta,
        )
        s.add(row)
        s.flush()
    return row


# -- rollback jobs --------------------------------------------------------------------


def _chain(records: dict[int, VersionRecord], n: int) -> set[int]:
    seen: set[int] = set()
    cur: int | None = n
    while cur is not None and cur not in seen:
        seen.add(cur)
        cur = records[cur].parent_number
    return seen


def _run_rollback(state: WorkerState, job_id: str) -> dict[str, Any]:
    rt = state.runtime
    engine = _engine(state)
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        target = int(job.payload["to_version"])
        records = version_records(s, state.model_id)
        head = max(records)
    if target not in records:
        raise ValueError(f"version {target} does not exist")
    _progress(state, job_id, 0.1, f"rebuilding version {target}")
    t0 = time.perf_counter()
    try:
        rt.sync(records, target, state.store)
        # every tensor this model's ledger ever edited, now equal to version `target`'s
        touched = set().union(*(r.tensor_sha256 for n, r in records.items() if n > 0))
        hashes = rt.tensor_hashes(sorted(touched))
        expected = records[target].tensor_sha256
        bad = [k for k, v in hashes.items() if k in expected and expected[k] != v]
        if bad:
            raise IntegrityError(f"rebuilt tensors differ from version {target}: {bad[:3]}")
        keep = _chain(records, target)
        with session_scope(engine) as s:
            number = _head(s, state.model_id) + 1
            if number != head + 1:
                raise RuntimeError("the ledger moved while the rollback was prepared")
            snapshot_id = None
            if number % state.spec.snapshot_every == 0:
                snap = state.store.put("snapshot", rt.snapshot_bytes())
                snapshot_id = _artifact(s, ArtifactKind.snapshot, snap, {"version": number}).id
            drift, drift_rel = rt.drift()
            version = Version(
                model_id=state.model_id,
                number=number,
                kind=VersionKind.rollback,
                parent_number=target,
                job_id=job_id,
                snapshot_artifact_id=snapshot_id,
                tensor_sha256=hashes,
                drift=drift,
                update_norm=None,
                timing={"total_s": time.perf_counter() - t0},
                info={"code_version": CODE_VERSION, "drift_relative": drift_rel},
            )
            s.add(version)
            s.flush()
            reverted, restored = _align_edit_statuses(s, state.model_id, records, keep, target)
    except BaseException:
        # the in-memory model may sit at `target` now: rebuild the ledger's head
        rt.sync(records, head, state.store)
        raise
    rt.current_version = number
    return {
        "versions": [number],
        "to_version": target,
        "reverted_edit_ids": reverted,
        "restored_edit_ids": restored,
        "tensor_sha256_equal": True,
    }


def _align_edit_statuses(
    s: Session, model_id: int, records: dict[int, VersionRecord], keep: set[int], target: int
) -> tuple[list[int], list[int]]:
    """After a rollback to ``target`` an edit is applied iff its version is on the
    target's chain: later edits become reverted; edits that an earlier rollback had
    reverted and that the target's chain contains are applied again."""
    on_chain = select(Version.id).where(Version.model_id == model_id, Version.number.in_(keep))
    off_chain = select(Version.id).where(
        Version.model_id == model_id, Version.number.in_([n for n in records if n not in keep])
    )
    reverted = s.scalars(
        update(Edit)
        .where(
            Edit.model_id == model_id,
            Edit.status == EditStatus.applied,
            Edit.version_id.in_(off_chain),
        )
        .values(status=EditStatus.reverted, reason=f"rolled back to version {target}")
        .returning(Edit.id)
    ).all()
    restored = s.scalars(
        update(Edit)
        .where(
            Edit.model_id == model_id,
            Edit.status == EditStatus.reverted,
            Edit.version_id.in_(on_chain),
        )
        .values(status=EditStatus.applied, reason=None)
        .returning(Edit.id)
    ).all()
    return sorted(reverted), sorted(restored)


# -- failure --------------------------------------------------------------------------


def _fail(state: WorkerState, job_id: str, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    log.error("job %s failed: %s", job_id, reason)
    with session_scope(_engine(state)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.failed, error=reason, finished_at=_now())
        )
        s.execute(
            update(Edit)
            .where(Edit.job_id == job_id, Edit.status == EditStatus.queued)
            .values(status=EditStatus.failed, reason=reason)
        )
