"""What every job does with the ledger: report progress, finish, fail, stop when an
operator cancels it. Thin: the SQL is :mod:`service.ledger.jobs`'s and
:mod:`service.ledger.job_control`'s."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from service.ledger import job_control
from service.ledger import jobs as ledger_jobs
from workers.state import WorkerState

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """An operator cancelled these running jobs: raised at a safe point (a progress
    report before the version's commit), so that the pipeline discards the update."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        super().__init__(f"cancelled by an operator: {', '.join(job_ids)}")
        self.job_ids = list(job_ids)


def progress(
    state: WorkerState,
    job_ids: str | Sequence[str],
    fraction: float,
    message: str,
    *,
    stoppable: bool = True,
) -> None:
    """Report the jobs' progress. When ``stoppable`` and an operator asked to cancel
    every one of them, raise :class:`JobCancelled` (the caller is at a safe point)."""
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    with state.ledger() as s:
        asked = ledger_jobs.set_progress(s, ids, fraction, message)
    if stoppable and ids and asked >= set(ids):
        raise JobCancelled(sorted(asked))


def cancelled(state: WorkerState, job_ids: Sequence[str]) -> list[str]:
    """End these running jobs as cancelled (their committed versions stay)."""
    with state.ledger() as s:
        done = job_control.cancelled(s, job_ids, job_control.CANCELLED_BY_OPERATOR)
    if done:
        log.info("jobs %s cancelled by an operator", done)
    return done


def cancel_requested(state: WorkerState, job_ids: Sequence[str]) -> set[str]:
    with state.ledger() as s:
        return job_control.cancel_requested(s, job_ids)


def finish(state: WorkerState, job_ids: Sequence[str], result: dict[str, Any] | None) -> None:
    """Mark running jobs succeeded (an edit job's result was written with its versions)."""
    with state.ledger() as s:
        ledger_jobs.finish(s, job_ids, result)


def reason_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_ledger_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the ledger database could not be
    reached: a connection refused, cut or timed out, not a bad query."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OperationalError | InterfaceError):
            return True
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def wait_for_ledger(state: WorkerState) -> float:
    """Block until the ledger answers again, with backoff (1 s doubling to 30 s), at
    most ``settings.ledger_outage_wait_s``; the seconds waited. ``TimeoutError`` if it
    does not come back in time."""
    started = time.monotonic()
    pause = 1.0
    while True:
        try:
            with state.ledger() as s:
                s.execute(text("SELECT 1"))
            return time.monotonic() - started
        except SQLAlchemyError as exc:
            waited = time.monotonic() - started
            if waited >= state.settings.ledger_outage_wait_s:
                raise TimeoutError(f"the ledger did not answer for {waited:.0f} s") from exc
            log.warning("the ledger does not answer (%s); next try in %.0f s",
                        type(exc).__name__, pause)  # fmt: skip
            time.sleep(pause)
            pause = min(30.0, pause * 2)


def fail(state: WorkerState, job_id: str, exc: BaseException) -> None:
    """The job failed with ``exc``; its queued edits fail with it. A ledger outage
    fails nothing: it is raised on, and :func:`workers.jobs.run_job` waits it out and
    puts the job back."""
    if is_ledger_outage(exc):
        raise exc
    if isinstance(exc, JobCancelled):
        cancelled(state, exc.job_ids)
        return
    reason = reason_of(exc)
    log.error("job %s failed: %s", job_id, reason)
    with state.ledger() as s:
        ledger_jobs.fail(s, job_id, reason)
