"""Writer or replica: what a worker of a model does, decided by the writer lease
(:mod:`service.ledger.lease`).

- The **writer** holds the lease. It serves the model's read, edit and evaluation
  queues, runs the reconciler (:mod:`workers.reconciler`), and, when it takes the
  lease, puts back the jobs the previous writer left unfinished
  (:func:`workers.startup.requeue_unfinished`): only then, so a worker that starts
  beside a live writer never resets that writer's running job.
- A **replica** serves the read and evaluation queues: score and generate, each
  synced to the version asked for (default the head) and hash-checked, and
  evaluations at their version, each under a claim that a writer taking the lease
  over respects (:class:`service.ledger.lease.JobClaim`). Before each dequeue it
  tries the lease
  (:meth:`Roles.check`, at most every :data:`CHECK_S` seconds while idle) and
  becomes the writer when the writer is gone.

A writer that finds its lease lost (PostgreSQL restarted, its connection was cut)
takes it again if it is free and becomes a replica if another worker took it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from rq import Queue

from service.ledger.lease import WriterLease
from service.presence import Phase, Presence
from workers.reconciler import Reconciler

log = logging.getLogger(__name__)

# how long an idle worker waits on its queues before it looks at the lease again
CHECK_S = 5


class Roles:
    """The lease and what follows from it for one worker's rq queues."""

    def __init__(
        self,
        lease: WriterLease,
        *,
        read_queue: Queue,
        writer_queues: Sequence[Queue],
        replica_queues: Sequence[Queue] | None = None,
        reconciler: Reconciler,
        take_over: Callable[[], Any],
        presence: Presence | None = None,
    ) -> None:
        self.lease = lease
        self.read_queue = read_queue
        self.writer_queues = list(writer_queues)
        self.replica_queues = list(replica_queues or [read_queue])
        self.reconciler = reconciler
        self.take_over = take_over
        self.presence = presence
        self.writer = False
        self._settled = False  # the worker's queues follow the role

    def queues(self) -> list[Queue]:
        return self.writer_queues if self.writer else self.replica_queues

    def check(self, worker: Any | None = None) -> bool:
        """Take or keep the lease if possible and set ``worker``'s queues to the role;
        returns whether this worker is the writer now."""
        if self.writer:
            writer = self.lease.held() or self.lease.try_acquire()
        else:
            writer = self.lease.try_acquire()
        if writer != self.writer or not self._settled:
            self._settled = True
            self._become(writer, worker)
        return self.writer

    def stop(self) -> None:
        self.reconciler.stop()
        self.lease.release()
        self.writer = False

    def _become(self, writer: bool, worker: Any | None) -> None:
        self.writer = writer
        if writer:
            moved = self.take_over()
            self.reconciler.start()
            log.info("this worker is the writer (put back %s unfinished job(s))", moved)
        else:
            self.reconciler.stop()
            log.warning("another worker holds the writer lease: this worker is a replica")
        if worker is not None:
            worker.queues = self.queues()
            worker._ordered_queues = list(worker.queues)
        if self.presence is not None:
            self.presence.set(Phase.ready, message=self.describe())

    def describe(self) -> str:
        if self.writer:
            return "writer"
        return "replica: serves reads and evaluations; takes over if the writer stops"
