"""Job functions the rq worker runs, by dotted path (``workers.jobs.run_job``).

Edit and rollback jobs are here; evaluation jobs are in :mod:`workers.evaluation_jobs`
(``run_job`` dispatches to it, and every version commit adds the evaluation jobs
that the model's policies ask for in the same transaction).

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

from redis.exceptions import RedisError
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.timeouts import JobTimeoutException
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import get_engine, session_scope
from service.models import (
    Artifact,
    ArtifactKind,
    Edit,
    EditStatus,
    Job,
    JobKind,
    JobStatus,
    Version,
    VersionKind,
)
from workers import guarding
from workers.batching import batch_size, claim_jobs, next_batch, pending_edits
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest, WeightDelta
from workers.evaluation.scoring import counterfact_scores, target_logprobs
from workers.evaluation.scoring import generate as greedy_generate
from workers.guarding import GuardCheck, GuardRejected
from workers.runtime import IntegrityError, VersionRecord
from workers.startup import (
    CODE_VERSION,
    chain,
    head_number,
    resolve_hparams,
    stats_provider_for,
    sync_to_head,
    version_records,
)
from workers.worker import WorkerState, current_state

log = logging.getLogger(__name__)

# how often a writer waiting to fill a batch looks for more queued edits
_POLL_S = 0.02
# a run claims at most this many batches' worth of other jobs' edits
_RUN_BATCHES = 4


def _now() -> datetime:
    return datetime.now(UTC)


def _engine(state: WorkerState):  # noqa: ANN202
    return get_engine(state.settings.database_url)


# -- job entry points -----------------------------------------------------------------


def run_job(job_id: str) -> dict[str, Any] | None:
    """Run an edit, rollback or evaluation job from the ledger.

    Only a ``queued`` job runs: a finished one, or one that a batch run of another
    job took along (``running``), makes its rq entry a no-op. An edit job may take
    other queued edit jobs along (:mod:`workers.batching`).
    """
    state = current_state()
    engine = _engine(state)
    with session_scope(engine) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LookupError(f"job {job_id} is not in the ledger")
        if job.status is not JobStatus.queued:
            log.info("job %s is %s; nothing to do", job_id, job.status.value)
            return job.result
        if job.model_id != state.model_id:
            raise RuntimeError(f"job {job_id} belongs to another model")
        job.status = JobStatus.running
        job.started_at = job.started_at or _now()
        kind = job.kind
    log.info("job %s (%s) started", job_id, kind.value)
    if kind is JobKind.edit:
        return _run_edits(state, job_id)
    if kind is JobKind.evaluation:
        from workers import evaluation_jobs  # noqa: PLC0415  (it imports this module)

        return evaluation_jobs.run_evaluation(state, job_id)
    try:
        sync_to_head(state)
        result = _run_rollback(state, job_id)
    except Exception as exc:
        _fail(state, job_id, exc)
        raise
    _finish(state, [job_id], result)
    log.info("job %s succeeded: %s", job_id, result.get("versions"))
    return result


def _finish(state: WorkerState, job_ids: Sequence[str], result: dict[str, Any] | None) -> None:
    """Mark running jobs succeeded (an edit job's result was written with its versions)."""
    values: dict[str, Any] = {
        "status": JobStatus.succeeded,
        "progress": 1.0,
        "finished_at": _now(),
        "message": None,
    }
    if result is not None:
        values["result"] = result
    with session_scope(_engine(state)) as s:
        s.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.running)
            .values(**values)
        )


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


def _progress(
    state: WorkerState, job_id: str | Sequence[str], fraction: float, message: str
) -> None:
    ids = [job_id] if isinstance(job_id, str) else list(job_id)
    with session_scope(_engine(state)) as s:
        s.execute(
            update(Job)
            .where(Job.id.in_(ids))
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


def _run_edits(state: WorkerState, job_id: str) -> dict[str, Any] | None:
    """Apply edit job ``job_id`` and the queued jobs it takes along, batch by batch.

    Batching (:mod:`workers.batching`): if the job asks for ``auto`` and its method
    takes several requests per delta, the writer claims compatible queued jobs until
    its next batch is full (``max_batch`` requests, no subject twice), waiting up to
    ``max_wait_ms`` for them. It applies that batch as one version, then tops the
    requests it still holds (later requests about a subject already in the batch)
    up again, without waiting, and so on until it holds nothing. A run claims at
    most :data:`_RUN_BATCHES` batches' worth of other jobs' requests, so that reads
    queued meanwhile are served. A job is finished as soon as its last edit is
    applied.

    A batch that fails touches only its own jobs; the others go on. If it held the
    requests of several jobs, each of them is tried again by itself (one client's
    bad request must not fail the others'); a job that fails by itself fails with
    the reason, its remaining edits too. A batch the guard rejects is retried the
    same way; a job whose own update the guard rejects has those edits marked
    ``rejected`` and goes on (docs/guard.md). If ``job_id`` itself failed, its exception
    is re-raised at the end, so that rq records it.
    """
    engine = _engine(state)
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        method = job.payload["method"]
        overrides = job.payload.get("hparams") or {}
        alone = job.payload.get("batching", "auto") == "alone"
    try:
        editor = get_editor(method)
        hparams = resolve_hparams(state, method, overrides)
    except Exception as exc:
        _fail(state, job_id, exc)
        raise
    size = batch_size(editor, state.spec.max_batch)
    batching = _Batching(
        state, job_id, method, overrides, size, size * _RUN_BATCHES if not alone and size > 1 else 0
    )
    failed: dict[str, Exception] = {}
    done: list[str] = []
    isolated: list[str] = []  # jobs of a failed batch, now tried one at a time
    applied = 0
    # seconds spent waiting for a first full batch (None: this job does not batch)
    wait_s = batching.fill(wait=True) if batching.budget else None
    topped = True  # whether the held requests were topped up since the last batch
    while True:
        active = [j for j in batching.held if j not in failed and j not in done]
        with session_scope(engine) as s:
            pending = pending_edits(s, active)
        with_edits = {e.job_id for e in pending}
        finished = [j for j in active if j not in with_edits]
        if finished:
            _finish(state, finished, None)
            done += finished
            log.info("jobs %s succeeded", finished)
        if not pending:
            break
        alone_now = next((j for j in isolated if j in with_edits), None)
        if alone_now is not None:
            batch = next_batch([e for e in pending if e.job_id == alone_now], size, _subject)
        else:
            batch = next_batch(pending, size, _subject)
            if len(batch) < size and batching.budget > 0 and not topped:
                batching.fill(wait=False)  # top the held requests up to a full batch
                topped = True
                continue
        jobs = list(dict.fromkeys(e.job_id for e in batch))
        running = [j for j in active if j in with_edits]
        report = _batch_reporter(state, running, applied, len(batch), applied + len(pending))
        try:
            sync_to_head(state)
            _apply_group(
                state,
                jobs[0],
                editor,
                method,
                hparams,
                batch,
                report,
                extra_timing=None if wait_s is None else {"batch_wait_s": wait_s},
            )
        except Exception as exc:
            if len(jobs) > 1 and not isinstance(exc, JobTimeoutException):
                log.warning(
                    "a batch of jobs %s failed (%s: %s); trying each job by itself",
                    jobs, type(exc).__name__, exc,
                )  # fmt: skip
                isolated += jobs
                continue
            if isinstance(exc, GuardRejected):
                # the guard's verdict on this job's own update: its edits end rejected
                guarding.mark_rejected(state, exc)
                continue
            for j in jobs:
                _fail(state, j, exc)
                failed[j] = exc
            if isinstance(exc, JobTimeoutException):
                for j in batching.held:
                    if j not in failed and j not in done:
                        _fail(state, j, exc)
                raise
        applied += len(batch)
        wait_s, topped = None, False
    if job_id in failed:
        raise failed[job_id]
    with session_scope(engine) as s:
        result = s.scalar(select(Job.result).where(Job.id == job_id))
    return result


def _batch_reporter(
    state: WorkerState, job_ids: list[str], done: int, size: int, total: int
) -> Callable[[float, str], None]:
    """Progress of a batch of ``size`` edits after ``done`` of ``total``, for every
    job that still has edits to apply."""

    def report(fraction: float, message: str) -> None:
        _progress(state, job_ids, (done + fraction * size) / total, message)

    return report


class _Batching:
    """The jobs one run holds (its own first) and the claiming of more."""

    def __init__(
        self,
        state: WorkerState,
        job_id: str,
        method: str,
        overrides: dict[str, Any],
        size: int,
        budget: int,
    ) -> None:
        self.state, self.job_id, self.method, self.overrides = state, job_id, method, overrides
        self.size = size
        self.budget = budget  # how many more edits of other jobs this run may claim
        self.held = [job_id]

    def fill(self, *, wait: bool) -> float:
        """Claim compatible queued jobs until the next batch is full or the budget is
        spent; with ``wait``, look again until ``max_wait_ms`` passed. Returns the
        seconds spent."""
        state = self.state
        t0 = time.monotonic()
        deadline = t0 + (state.spec.max_wait_ms / 1000.0 if wait else 0.0)
        told = False
        claimed = 0
        while self.budget > 0:
            with session_scope(_engine(state)) as s:
                free = self.size - len(next_batch(pending_edits(s, self.held), self.size, _subject))
                ids, n = (
                    claim_jobs(
                        s,
                        state.model_id,
                        self.method,
                        self.overrides,
                        min(free, self.budget),
                        self.job_id,
                    )
                    if free > 0
                    else ([], 0)
                )
            self.held += ids
            self.budget -= n
            claimed += len(ids)
            _drop_queue_entries(ids)
            now = time.monotonic()
            if free - n <= 0 and ids:
                continue  # the claimed jobs may hold subjects already in the batch
            if free <= 0 or now >= deadline:
                break
            if ids:
                continue
            if not told:
                msg = f"waiting up to {state.spec.max_wait_ms} ms for more edits"
                _progress(state, self.job_id, 0.0, msg)
                told = True
            time.sleep(min(_POLL_S, deadline - now))
        seconds = time.monotonic() - t0
        if claimed:
            log.info(
                "job %s took %d queued jobs along (%.3f s)", self.job_id, claimed, seconds
            )  # fmt: skip
        return seconds


def _subject(e: Edit) -> str:
    return e.subject


def _drop_queue_entries(job_ids: Sequence[str]) -> None:
    """Delete the rq entries of jobs this run claimed, so that the worker does not
    dequeue them one by one only to find them taken. Best effort: an entry left
    behind is a no-op when dequeued (the ledger says the job is not queued), and a
    claimed job without an entry is re-enqueued by :func:`workers.startup.requeue_unfinished` if the
    worker dies before finishing it."""
    current = get_current_job()
    if current is None or not job_ids:
        return
    for jid in job_ids:
        try:
            RqJob.fetch(jid, connection=current.connection).delete()
        except NoSuchJobError:
            pass
        except RedisError:
            log.warning("could not drop the queue entry of claimed job %s", jid, exc_info=True)


def _apply_group(
    state: WorkerState,
    job_id: str,
    editor: Any,
    method: str,
    hparams: Any,
    group: list[Edit],
    report: Any,
    extra_timing: dict[str, float] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Compute, measure, guard and commit one version applying ``group`` (edits of one
    or more jobs; ``job_id`` is the version's job). The model is unchanged on failure
    and when the guard rejects the update (:class:`GuardRejected`, docs/guard.md)."""
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
            if editor.uses_statistics
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
    prior = guarding.before(state, group)  # the canary of the parent version (cached)
    staged = rt.stage(delta)
    try:
        report(0.85, "measuring after the edit")
        t1 = time.perf_counter()
        after = _measure(state, scored)
        t_eval = time.perf_counter() - t1
        check = None
        if prior is not None:
            check = guarding.judge(state, method, group, staged.update_norm, prior)
            if not check.verdict.accepted:
                rows = [
                    _metrics_row(b, a, i) for b, a, i in zip(before, after, inferred, strict=True)
                ]
                raise guarding.rejection(state, job_id, method, group, check, rows)
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
            timing={**(extra_timing or {}), "compute_s": t_compute, "evaluate_s": t_eval},
            t_start=t_start,
            guard=check,
        )
    except BaseException:
        rt.discard(staged)
        raise
    rt.commit(staged, number)
    guarding.accepted(state, check, number)
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
    guard: GuardCheck | None = None,
) -> tuple[int, dict[str, Any]]:
    rt = state.runtime
    delta_blob = delta.to_bytes()
    stored_delta = state.store.put("delta", delta_blob)
    engine = _engine(state)
    with session_scope(engine) as s:
        number = head_number(s, state.model_id) + 1
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
        if guard is not None:
            timing = {**timing, "guard_s": guard.seconds}
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
                "batch": {
                    "size": len(group),
                    "edit_ids": [e.id for e in group],
                    "job_ids": list(dict.fromkeys(e.job_id for e in group)),
                },
            },
        )
        s.add(version)
        s.flush()
        if guard is not None:
            guarding.record(s, state, job_id, method, group, guard, version.id)
        metrics: dict[str, Any] = {}
        by_job: dict[str, dict[str, Any]] = {}
        for e, b, a, inf in zip(group, before, after, inferred, strict=True):
            row = _metrics_row(b, a, inf)
            s.execute(
                update(Edit)
                .where(Edit.id == e.id)
                .values(status=EditStatus.applied, version_id=version.id, metrics=row, reason=None)
            )
            metrics[str(e.id)] = row
            by_job.setdefault(e.job_id, {})[str(e.id)] = row
        # each job's result grows in the version's transaction: a worker that dies
        # later leaves the result matching the applied edits
        for jid, rows in by_job.items():
            job = s.get(Job, jid)
            assert job is not None
            old = job.result or {}
            job.result = {
                "versions": [*old.get("versions", []), number],
                "metrics": {**old.get("metrics", {}), **rows},
                "method": method,
                "batches": [
                    *old.get("batches", []),
                    {"version": number, "size": len(group), "edit_ids": [int(k) for k in rows]},
                ],
            }
        scheduled = _schedule_evaluations(s, state, number)
    _enqueue_evaluations(state, scheduled)
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
        keep = chain(records, target)
        with session_scope(engine) as s:
            number = head_number(s, state.model_id) + 1
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
            scheduled = _schedule_evaluations(s, state, number)
    except BaseException:
        # the in-memory model may sit at `target` now: rebuild the ledger's head
        rt.sync(records, head, state.store)
        raise
    rt.current_version = number
    _enqueue_evaluations(state, scheduled)
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


# -- the evaluation policy hook -------------------------------------------------------


def _schedule_evaluations(s: Session, state: WorkerState, number: int) -> list[str]:
    """In version ``number``'s commit transaction: the evaluation jobs due by policy."""
    from workers import evaluation_jobs  # noqa: PLC0415  (it imports this module)

    return evaluation_jobs.schedule(s, state, number)


def _enqueue_evaluations(state: WorkerState, job_ids: list[str]) -> None:
    from workers import evaluation_jobs  # noqa: PLC0415

    evaluation_jobs.enqueue(state, job_ids)


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
