"""Edit jobs: the queued requests of one job (and the compatible jobs it takes along,
:mod:`workers.batching`) applied batch by batch, one version each, through the edit
pipeline (:func:`workers.pipeline.apply_update`).

For each batch: sync to the ledger's head, infer a missing ``target_true`` from the
unedited model, then the pipeline measures, computes, stages, judges (the guard,
:mod:`workers.jobs.guard`) and commits; the commit (:func:`_commit`) writes the
version, its artifacts, the guard's decision, the edits' metrics and the jobs'
results in one transaction, and schedules the evaluations the policies ask for.

A batch that fails touches only its own jobs; the others go on. If it held the
requests of several jobs, each of them is tried again by itself (one client's bad
request must not fail the others'); a job that fails by itself fails with the
reason, its remaining edits too. A batch the guard rejects is retried the same way;
a job whose own update the guard rejects has those edits marked ``rejected`` and goes
on (docs/guard.md). If the job itself failed, its exception is re-raised at the end,
so that rq records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.timeouts import JobTimeoutException

from service import logs
from service.ledger import edits as ledger_edits
from service.ledger import jobs as ledger_jobs
from service.ledger import versions as ledger_versions
from service.ledger.tables import Edit, VersionKind
from service.ledger.versions import NewVersion
from workers import pipeline, tokens
from workers.batching import batch_size, next_batch
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest
from workers.evaluation.scoring import counterfact_scores
from workers.jobs import evaluation
from workers.jobs import guard as job_guard
from workers.jobs.common import JobCancelled, cancel_requested, cancelled, fail, finish, progress
from workers.jobs.edit_requests import (
    Suppress,
    find_superseded,
    metrics_row,
    request_of,
    with_target_true,
)
from workers.runtime import Staged
from workers.startup import (
    CODE_VERSION,
    resolve_hparams,
    stats_provider_for,
    sync_to_head,
    templates_provider_for,
)
from workers.state import WorkerState

log = logging.getLogger(__name__)

# how often a writer waiting to fill a batch looks for more queued edits
_POLL_S = 0.02
# a run claims at most this many batches' worth of other jobs' edits
_RUN_BATCHES = 4


def run_edits(state: WorkerState, job_id: str) -> dict[str, Any] | None:
    """Apply edit job ``job_id`` and the queued jobs it takes along (the module doc).

    Batching (:mod:`workers.batching`): if the job asks for ``auto`` and its method
    takes several requests per delta, the writer claims compatible queued jobs until
    its next batch is full (``max_batch`` requests, no subject twice), waiting up to
    ``max_wait_ms`` for them. It applies that batch as one version, then tops the
    requests it still holds (later requests about a subject already in the batch) up
    again, without waiting, and so on until it holds nothing. A run claims at most
    :data:`_RUN_BATCHES` batches' worth of other jobs' requests, so that reads queued
    meanwhile are served. A job is finished as soon as its last edit is applied.
    """
    with state.ledger() as s:
        payload = ledger_jobs.edit_payload(s, job_id)
    method = payload["method"]
    overrides = payload.get("hparams") or {}
    alone = payload.get("batching", "auto") == "alone"
    try:
        editor = get_editor(method)
        hparams = resolve_hparams(state, method, overrides)
    except Exception as exc:
        fail(state, job_id, exc)
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
    checked: set[str] = set()  # jobs whose texts were counted in tokens
    while True:
        active = [j for j in batching.held if j not in failed and j not in done]
        stopped = cancel_requested(state, active)  # a safe point: between two batches
        if stopped:
            done += cancelled(state, sorted(stopped))
            active = [j for j in active if j not in stopped]
        with state.ledger() as s:
            pending = ledger_edits.pending_edits(s, active)
        with_edits = {e.job_id for e in pending}
        refused = _too_long(state, hparams, [e for e in pending if e.job_id not in checked])
        checked.update(with_edits)
        if refused:
            for j, exc in refused.items():
                fail(state, j, exc)
                failed[j] = exc
            continue
        finished = [j for j in active if j not in with_edits]
        if finished:
            finish(state, finished, None)
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
            extra = None if wait_s is None else {"batch_wait_s": wait_s}
            with logs.bound(edit_ids=[e.id for e in batch]):
                _apply_batch(state, jobs[0], editor, method, hparams, batch, report, extra)
        except JobCancelled as exc:  # stopped inside its own batch, before the commit
            done += cancelled(state, exc.job_ids)
            continue
        except Exception as exc:
            if len(jobs) > 1 and not isinstance(exc, JobTimeoutException):
                log.warning(
                    "a batch of jobs %s failed (%s: %s); trying each job by itself",
                    jobs, type(exc).__name__, exc,
                )  # fmt: skip
                isolated += jobs
                continue
            if isinstance(exc, job_guard.GuardRejected):
                # the guard's verdict on this job's own update: its edits end rejected
                job_guard.mark_rejected(state, exc)
                continue
            for j in jobs:
                fail(state, j, exc)
                failed[j] = exc
            if isinstance(exc, JobTimeoutException):
                for j in batching.held:
                    if j not in failed and j not in done:
                        fail(state, j, exc)
                raise
        applied += len(batch)
        wait_s, topped = None, False
    if job_id in failed:
        raise failed[job_id]
    with state.ledger() as s:
        return ledger_jobs.get_job(s, job_id).result


def _too_long(
    state: WorkerState, hparams: Any, pending: Sequence[Edit]
) -> dict[str, tokens.PromptTooLong]:
    """The jobs among ``pending``'s with a text longer than the worker takes in tokens
    (:mod:`workers.tokens`), each with its first such text."""
    rt = state.runtime
    limit = tokens.edit_limit(rt.model, state.settings.max_prompt_tokens, hparams)
    refused: dict[str, tokens.PromptTooLong] = {}
    index: dict[str, int] = {}
    for e in pending:
        i = index[e.job_id] = index.get(e.job_id, -1) + 1
        if e.job_id in refused:
            continue
        try:
            tokens.check(rt.tokenizer, tokens.edit_texts(i, e), limit)
        except tokens.PromptTooLong as exc:
            refused[e.job_id] = exc
    return refused


def _batch_reporter(
    state: WorkerState, job_ids: list[str], done: int, size: int, total: int
) -> Callable[[float, str], None]:
    """Progress of a batch of ``size`` edits after ``done`` of ``total``, for every
    job that still has edits to apply."""

    def report(fraction: float, message: str) -> None:
        progress(state, job_ids, (done + fraction * size) / total, message)

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
            with state.ledger() as s:
                held = ledger_edits.pending_edits(s, self.held)
                free = self.size - len(next_batch(held, self.size, _subject))
                ids, n = (
                    ledger_jobs.claim_batchable(
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
                progress(state, self.job_id, 0.0, msg, stoppable=False)
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
    claimed job without an entry is re-enqueued by
    :func:`workers.startup.requeue_unfinished` if the worker dies before finishing it."""
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


# -- one batch, one version ------------------------------------------------------------


def _apply_batch(
    state: WorkerState,
    job_id: str,
    editor: Any,
    method: str,
    hparams: Any,
    group: list[Edit],
    report: Callable[[float, str], None],
    extra_timing: dict[str, float] | None = None,
) -> int:
    """One version applying ``group`` (edits of one or more jobs; ``job_id`` is the
    version's job) through the pipeline. The model is unchanged on failure and when
    the guard rejects the update (then :class:`~workers.jobs.guard.GuardRejected`)."""
    rt = state.runtime
    t_start = time.perf_counter()
    supersedes = find_superseded(state, group)
    requests = [
        replace(request_of(e), suppress=supersedes[e.id][1])
        if e.id in supersedes
        else request_of(e)
        for e in group
    ]
    scored: list[EditRequest] = []
    inferred: list[str | None] = []  # the target_true used when the client gave none
    for r in requests:
        r2, was_inferred = with_target_true(state, r)
        scored.append(r2)
        inferred.append(r2.target_true if was_inferred else None)
    ctx = EditContext(
        device=state.settings.device,
        cache=state.editor_cache,
        stats_provider=(
            stats_provider_for(state, hparams, lambda f, m: report(0.1, m))
            if editor.uses_statistics
            else None
        ),
        progress=lambda f, m: report(0.1 + 0.7 * f, m),
        state=rt.method_state(),
        templates_provider=templates_provider_for(state),
    )
    messages = {
        "measuring before": (0.0, f"measuring {len(group)} facts before the edit"),
        "measuring after": (0.85, "measuring after the edit"),
    }

    def on_phase(phase: str) -> None:
        if phase in messages:
            report(*messages[phase])

    def measure(runtime: Any) -> pipeline.Scores:
        return [counterfact_scores(runtime.model, runtime.tokenizer, r) for r in scored]

    def commit(staged: Staged, outcome: pipeline.Outcome) -> int:
        return _commit(
            state, job_id, method, hparams, group, staged, outcome, inferred, extra_timing,
            t_start, supersedes,
        )  # fmt: skip

    outcome = pipeline.apply_update(
        rt,
        editor,
        hparams,
        requests,
        ctx,
        group=group,
        measure=measure,
        guard=job_guard.for_job(state, method),
        commit=commit,
        on_phase=on_phase,
    )
    if outcome.number is None:
        check = outcome.judgement
        if not isinstance(check, job_guard.GuardCheck):
            raise RuntimeError("an update was discarded without the guard's verdict")
        rows = [
            metrics_row(b, a, i)
            for b, a, i in zip(outcome.before or [], outcome.after or [], inferred, strict=True)
        ]
        raise job_guard.record_rejection(state, job_id, method, group, check, rows)
    log.info("version %d committed: %d edit(s) by %s", outcome.number, len(group), method,
             extra={"version": outcome.number})  # fmt: skip
    return outcome.number


def _commit(
    state: WorkerState,
    job_id: str,
    method: str,
    hparams: Any,
    group: list[Edit],
    staged: Staged,
    outcome: pipeline.Outcome,
    inferred: list[str | None],
    extra_timing: dict[str, float] | None,
    t_start: float,
    supersedes: Mapping[int, tuple[int, Suppress]],
) -> int:
    """The version of one accepted update, in one transaction: the version row and its
    artifacts, the guard's decision, the edits' metrics and statuses (the edits they
    supersede too), each job's result, and the evaluation jobs the policies ask for
    (queued after the commit)."""
    rt = state.runtime
    stored_delta = state.store.put("delta", outcome.delta.to_bytes())
    check = outcome.judgement if isinstance(outcome.judgement, job_guard.GuardCheck) else None
    timing = {
        **(extra_timing or {}),
        "compute_s": outcome.timing["compute_s"],
        "evaluate_s": outcome.timing["measure_after_s"],
    }
    if check is not None:
        timing["guard_s"] = check.seconds
    rows_by_edit = {
        e.id: metrics_row(b, a, i)
        for e, b, a, i in zip(
            group, outcome.before or [], outcome.after or [], inferred, strict=True
        )
    }
    for new_id, (old_id, suppressed) in supersedes.items():
        rows_by_edit[new_id]["supersedes"] = old_id
        rows_by_edit[new_id]["suppressed"] = [list(x) for x in suppressed]
    with state.ledger() as s:
        if rt.current_version is None:
            raise RuntimeError("the runtime is at no known version")
        number = ledger_versions.next_number(s, state.model_id, rt.current_version)
        snapshot = None
        if number % state.spec.snapshot_every == 0:
            snapshot = state.store.put("snapshot", staged.snapshot_bytes())
        version = ledger_versions.add_version(
            s,
            state.model_id,
            NewVersion(
                number=number,
                kind=VersionKind.edit,
                parent_number=number - 1,
                job_id=job_id,
                method=method,
                hparams=hparams.model_dump(mode="json"),
                delta=stored_delta,
                snapshot=snapshot,
                tensor_sha256=staged.tensor_sha256,
                drift=staged.drift,
                update_norm=staged.update_norm,
                timing={**timing, "total_s": time.perf_counter() - t_start},
                info={
                    "code_version": CODE_VERSION,
                    "source": state.spec.source,
                    "drift_relative": staged.drift_relative,
                    "delta_meta": outcome.delta.meta,
                    "batch": {
                        "size": len(group),
                        "edit_ids": [e.id for e in group],
                        "job_ids": list(dict.fromkeys(e.job_id for e in group)),
                    },
                },
            ),
        )
        if check is not None:
            job_guard.record(s, state, job_id, method, group, check, version.id)
        ledger_edits.mark_applied(s, version.id, rows_by_edit)
        ledger_edits.mark_superseded(s, {n: old for n, (old, _) in supersedes.items()})
        by_job: dict[str, dict[str, Any]] = {}
        for e in group:
            by_job.setdefault(e.job_id, {})[str(e.id)] = rows_by_edit[e.id]
        ledger_jobs.add_version_results(s, number, method, len(group), by_job)
        scheduled = evaluation.schedule(s, state, number)
    evaluation.enqueue(state, scheduled)
    return number
