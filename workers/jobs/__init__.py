"""The job functions the rq worker runs, by dotted path: ``workers.jobs.run_job``
(edit, rollback, export, import and evaluation jobs of the ledger), ``workers.jobs.score`` and
``workers.jobs.generate`` (reads). Each takes the worker's state first (passed by the
worker, :func:`~workers.state.needs_state`); the queue carries the rest.

The ledger is the truth: a job reads its input from Postgres, computes with the
in-memory model, writes the artifacts, commits the new version in one transaction
and only then lets the in-memory model move to it. If anything fails before the
commit, the model is restored exactly, the job and its unapplied edits are marked
failed with the reason, and the exception is re-raised so that rq records it too. A
job whose ledger row is already finished does nothing.

One module per kind: :mod:`~workers.jobs.edit`, :mod:`~workers.jobs.rollback`,
:mod:`~workers.jobs.export` (exports and imports),
:mod:`~workers.jobs.evaluation`, :mod:`~workers.jobs.reads`.
"""

from __future__ import annotations

import logging
from typing import Any

from service import logs
from service.ledger import jobs as ledger_jobs
from service.ledger.lease import JobClaim
from service.ledger.tables import JobKind
from workers.jobs import edit, evaluation, export, reads, rollback
from workers.jobs.common import JobCancelled, fail, finish, is_ledger_outage, wait_for_ledger
from workers.startup import sync_to_head
from workers.state import WorkerState, needs_state

log = logging.getLogger(__name__)


@needs_state
def run_job(state: WorkerState, job_id: str) -> dict[str, Any] | None:
    """Run a job of the ledger (:func:`_run`).

    A ledger outage during the job fails nothing: the worker waits until the ledger
    answers again (:func:`~workers.jobs.common.wait_for_ledger`), then puts the
    model's unfinished jobs back in the queue (their applied edits stay applied, the
    in-memory model is re-synced by the next job), so that nothing stays
    ``running``; the reconciler enqueues them again.
    """
    try:
        with logs.bound(model=state.name, job_id=job_id):
            return _run(state, job_id)
    except JobCancelled as exc:
        log.info("job %s stopped: %s", job_id, exc)
        return None
    except Exception as exc:
        if not is_ledger_outage(exc):
            raise
        log.warning("job %s: the ledger stopped answering (%s); waiting for it",
                    job_id, type(exc).__name__)  # fmt: skip
        waited = wait_for_ledger(state)
        with state.ledger() as s:
            moved = ledger_jobs.put_back_running(
                s, state.model_id, "put back in the queue after a ledger outage"
            )
        # the reconciler enqueues them again (this job's own entry ends with this call)
        log.warning("the ledger is back after %.0f s; put back %s", waited, moved or "no job")
        return None


def _run(state: WorkerState, job_id: str) -> dict[str, Any] | None:
    """Run an edit, rollback or evaluation job from the ledger; an evaluation under
    its claim (:class:`~service.ledger.lease.JobClaim`), since the writer and every
    replica serve the evaluation queue: a writer taking the lease over then leaves
    a live replica's running evaluation alone."""
    with state.ledger() as s:
        kind = ledger_jobs.job_kind(s, job_id)
    if kind is not JobKind.evaluation:
        return _start(state, job_id)
    with JobClaim(state.engine, job_id) as claimed:
        if not claimed:
            log.info("evaluation job %s is claimed by another worker; nothing to do", job_id)
            return None
        return _start(state, job_id)


def _start(state: WorkerState, job_id: str) -> dict[str, Any] | None:
    """Start job ``job_id`` (or the older one its entry runs) and run it.

    The entry of any job but an evaluation runs the model's oldest queued such job
    (:func:`service.ledger.jobs.start_job`: the ledger's order, not
    Redis's); an entry that finds nothing queued (its job finished, or taken along
    into another job's batches) is a no-op. An edit job may take
    other queued edit jobs along (:mod:`workers.batching`).
    """
    with state.ledger() as s:
        job = ledger_jobs.start_job(s, job_id, state.model_id)
        if job is None:
            current = ledger_jobs.get_job(s, job_id)
            log.info("job %s is %s; nothing to do", job_id, current.status.value)
            return current.result
        kind = job.kind
        job_id = job.id  # an older queued job goes first (ledger order)
    with logs.bound(job_id=job_id):
        return _run_kind(state, job_id, kind)


def _run_kind(state: WorkerState, job_id: str, kind: JobKind) -> dict[str, Any] | None:
    log.info("job %s (%s) started", job_id, kind.value)
    if kind is JobKind.edit:
        return edit.run_edits(state, job_id)
    if kind is JobKind.evaluation:
        return evaluation.run_evaluation(state, job_id)
    run = {
        JobKind.rollback: rollback.run_rollback,
        JobKind.export: export.run_export,
        JobKind.import_: export.run_import,
    }[kind]
    try:
        sync_to_head(state)
        result = run(state, job_id)
    except Exception as exc:
        fail(state, job_id, exc)
        raise
    if kind is JobKind.rollback:  # exports and imports finish in their last transaction
        finish(state, [job_id], result)
    log.info("job %s succeeded: %s", job_id, result.get("versions"))
    return result


@needs_state
def score(
    state: WorkerState,
    model: str,
    prompts: list[str],
    targets: list[str],
    version: int | None = None,
) -> dict[str, Any]:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at
    ``version`` (default: the head)."""
    return reads.score(state, model, prompts, targets, version)


@needs_state
def generate(
    state: WorkerState, model: str, prompt: str, max_new_tokens: int, version: int | None = None
) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` at ``version`` (default: the head)."""
    return reads.generate(state, model, prompt, max_new_tokens, version)
