"""The writer lease: exactly one worker per model writes (edits, rollbacks, the
reconciler); every other worker of the model is a replica that serves reads and
evaluations. And the claim on a running evaluation (:class:`JobClaim`), which tells
a worker that takes the lease over which running evaluations are still alive.

The lease is a PostgreSQL session-level advisory lock on ``(NAMESPACE, model id)``,
held on a connection of its own for as long as the writer lives. PostgreSQL frees
it when that connection ends: the writer exits or is killed, its host disappears
(TCP keepalives), or PostgreSQL restarts. A replica that tries again then takes it
over. A worker checks that it still holds the lease before each job it takes
(:meth:`WriterLease.held`), and a version's number is unique per model, so even a
writer that lost the lease without noticing cannot commit a second version N.
"""

from __future__ import annotations

import contextlib
import logging
from types import TracebackType

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

# the first key of memedit's advisory locks (the second is the model's id)
NAMESPACE = 0x6D65  # "me"
# the first key of the claims on running jobs (the second is hashtext(job id))
JOB_NAMESPACE = NAMESPACE + 1


class WriterLease:
    """The advisory lock of one model, taken on a connection of its own."""

    def __init__(self, engine: Engine, model_id: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True if this worker holds it now."""
        if self.held():
            return True
        self._conn = _lock_on_own_connection(
            self.engine,
            "SELECT pg_try_advisory_lock(:ns, :model)",
            {"ns": NAMESPACE, "model": self.model_id},
            f"writer lease of model {self.model_id}",
        )
        if self._conn is None:
            return False
        log.info("took the writer lease of model %d", self.model_id)
        return True

    def held(self) -> bool:
        """Whether this worker still holds the lease (its connection answers)."""
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            log.warning("lost the writer lease of model %d (its connection ended)", self.model_id)
            self._drop()
            return False

    def release(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):  # a lost connection took the lock along
            self._conn.execute(
                text("SELECT pg_advisory_unlock(:ns, :model)"),
                {"ns": NAMESPACE, "model": self.model_id},
            )
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()


def _lock_on_own_connection(
    engine: Engine, sql: str, params: dict[str, object], what: str
) -> Connection | None:
    """A new connection holding the advisory lock that ``sql`` tries, or None when it
    is held elsewhere or the ledger did not answer."""
    try:
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except SQLAlchemyError as exc:
        log.warning("%s: the ledger did not answer (%s)", what, exc)
        return None
    try:
        got = conn.execute(text(sql), params).scalar_one()
    except SQLAlchemyError as exc:
        conn.close()
        log.warning("%s: %s", what, exc)
        return None
    if not got:
        conn.close()
        return None
    return conn


class JobClaim:
    """``with JobClaim(engine, job_id) as claimed:`` holds an advisory lock on the job
    while its block runs, on a connection of its own, so that PostgreSQL frees it when
    the worker dies. ``claimed`` is False when another worker holds it (or the ledger
    did not answer): that worker runs the job.

    A worker running an evaluation holds its claim; one that takes the writer lease
    over puts back only the running evaluations nobody claims
    (:func:`claimed_elsewhere`). The second key is ``hashtext`` of the id: two running
    jobs whose ids collide would shield each other from a put-back while both run."""

    def __init__(self, engine: Engine, job_id: str) -> None:
        self.engine = engine
        self.job_id = job_id
        self._conn: Connection | None = None

    def __enter__(self) -> bool:
        self._conn = _lock_on_own_connection(
            self.engine,
            "SELECT pg_try_advisory_lock(:ns, hashtext(:job))",
            {"ns": JOB_NAMESPACE, "job": self.job_id},
            f"claim on job {self.job_id}",
        )
        return self._conn is not None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            conn.execute(
                text("SELECT pg_advisory_unlock(:ns, hashtext(:job))"),
                {"ns": JOB_NAMESPACE, "job": self.job_id},
            )
        with contextlib.suppress(SQLAlchemyError):
            conn.close()


def claimed_elsewhere(session: Session, job_id: str) -> bool:
    """Whether a live worker holds the claim on ``job_id`` (:class:`JobClaim`). Tries
    the lock for the rest of ``session``'s transaction: a worker that dequeues the
    job meanwhile finds it claimed and leaves it to the re-enqueued entry."""
    got = session.execute(
        text("SELECT pg_try_advisory_xact_lock(:ns, hashtext(:job))"),
        {"ns": JOB_NAMESPACE, "job": job_id},
    ).scalar_one()
    return not got
