"""The writer's reconciler: the ledger says which jobs wait, Redis only carries their
ids, and this puts back into Redis what it lost.

Every ``settings.reconcile_interval_s`` a thread of the model's writer compares the
model's ``queued`` ledger jobs (older than :data:`GRACE_S`, so that a job the API is
committing and enqueueing right now is left to the API) with the entries of its edit
and evaluation queues. A job with no waiting entry and no running one (a FLUSHALL, a
Redis that was down when the API committed the job, an entry deleted by hand) is
enqueued again, in ledger order; a stale entry (finished, failed) is dropped first.
Where an entry lands in the queue does not matter: an edit or rollback entry runs
the model's oldest queued edit or rollback job (:func:`service.ledger.jobs.start_job`),
so lost jobs still run before newer ones. A job enqueued twice is harmless: only a
``queued`` ledger job runs, a second entry finds nothing to do.

It needs neither torch nor the model: :class:`Reconciler` runs on its own ledger
sessions and Redis client, beside the rq loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service import queue
from service.ledger import jobs as ledger_jobs
from service.ledger.sessions import session_scope
from service.ledger.tables import JobKind, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

# a queued job younger than this is the API's to enqueue (it commits, then enqueues)
GRACE_S = 2.0
# the longest wait between two passes while Redis or PostgreSQL does not answer
_MAX_BACKOFF_S = 60.0


@dataclass
class Reconciler:
    """Re-enqueue the model's ledger jobs that Redis lost (:meth:`run_once`), every
    ``settings.reconcile_interval_s`` in a daemon thread (:meth:`start`)."""

    settings: Settings
    model: str
    model_id: int
    engine: Engine
    redis: Redis
    grace_s: float = GRACE_S

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[str]:
        """One pass: the ids of the jobs it enqueued again, in ledger order."""
        created_before = utcnow() - timedelta(seconds=self.grace_s)
        with session_scope(self.engine) as s:
            waiting = ledger_jobs.queued_jobs(s, self.model_id, created_before)
        if not waiting:
            return []
        names = {kind: self._queue_name(kind) for _, kind in waiting}
        present = {name: queue.waiting_ids(self.redis, name) for name in set(names.values())}
        lost: list[tuple[str, str, str | None]] = []
        for job_id, kind in waiting:
            name = names[kind]
            if job_id in present[name]:
                continue
            status = queue.entry_status(self.redis, job_id)
            if status == "started":
                continue  # a worker has it: its run marks the ledger job running
            lost.append((job_id, name, status))
        for job_id, name, status in lost:
            if status is not None:
                queue.drop_entry(self.redis, job_id)
            queue.enqueue_job(self.redis, self.settings, self.model, job_id, queue_name=name)
        if lost:
            log.warning(
                "re-enqueued %d job(s) of %s that Redis had lost: %s",
                len(lost),
                self.model,
                ", ".join(job_id for job_id, _, _ in lost),
            )
        return [job_id for job_id, _, _ in lost]

    def _queue_name(self, kind: JobKind) -> str:
        if kind is JobKind.evaluation:
            return self.settings.eval_queue(self.model)
        return self.settings.edit_queue(self.model)

    # -- the thread ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"reconciler-{self.model}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        interval = self.settings.reconcile_interval_s
        wait = interval
        while not self._stop.wait(wait):
            try:
                self.run_once()
                wait = interval
            except (RedisError, SQLAlchemyError) as exc:
                wait = min(_MAX_BACKOFF_S, wait * 2)
                log.warning("reconciler of %s: %s; next try in %.0f s", self.model, exc, wait)
            except Exception:  # keep reconciling: a bug here must not stop the writer
                wait = min(_MAX_BACKOFF_S, wait * 2)
                log.exception("reconciler of %s failed; next try in %.0f s", self.model, wait)
