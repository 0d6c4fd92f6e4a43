"""What every job does with the ledger: report progress, finish, fail. Thin: the
SQL is :mod:`service.ledger.jobs`'s."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from service.ledger import jobs as ledger_jobs
from workers.state import WorkerState

log = logging.getLogger(__name__)


def progress(
    state: WorkerState, job_ids: str | Sequence[str], fraction: float, message: str
) -> None:
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    with state.ledger() as s:
        ledger_jobs.set_progress(s, ids, fraction, message)


def finish(state: WorkerState, job_ids: Sequence[str], result: dict[str, Any] | None) -> None:
    """Mark running jobs succeeded (an edit job's result was written with its versions)."""
    with state.ledger() as s:
        ledger_jobs.finish(s, job_ids, result)


def reason_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def fail(state: WorkerState, job_id: str, exc: BaseException) -> None:
    """The job failed with ``exc``; its queued edits fail with it."""
    reason = reason_of(exc)
    log.error("job %s failed: %s", job_id, reason)
    with state.ledger() as s:
        ledger_jobs.fail(s, job_id, reason)
