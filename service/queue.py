"""Hand work to the model workers through Redis (rq), by dotted path.

The API never imports torch or :mod:`workers`: jobs name their function as a
string that only the worker process resolves. Two kinds of work:

- Edit and rollback jobs go to ``settings.edit_queue(model)`` as
  ``workers.jobs.run_job(job_id)``, with the rq job id equal to the ledger job id;
  evaluation jobs go the same way to ``settings.eval_queue(model)``, which the
  writer serves after its edits (:func:`enqueue_evaluation`).
  The caller commits the ledger row first; Redis only carries the id, and the
  model's writer re-enqueues ledger jobs that Redis lost (workers/reconciler.py).
- Score and generate go to ``settings.read_queue(model)`` and the API waits for
  the answer up to ``settings.sync_timeout_s`` (:func:`call_read`, on a client whose
  read timeout exceeds that wait: :mod:`service.redis_clients`). No worker serves
  the model, or none answered in time → :class:`WorkerUnavailable` (503 with
  ``Retry-After`` and the worker's state; a request nobody took is deleted so that
  no worker runs it later); the worker raised → :class:`WorkerFailed` with the
  exception's message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Literal

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job as RqJob
from rq.results import Result

from service import presence
from service.errors import InvalidInput, Unavailable, WorkerFailed, WorkerUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "workers.jobs.run_job"
READ_FUNCTIONS = {"score": "workers.jobs.score", "generate": "workers.jobs.generate"}

# how long a read's answer (or failure) stays in Redis after the API got it
_READ_RESULT_TTL_S = 60
# a read nobody took expires this long after the API stopped waiting for it (the API
# deletes it itself; this covers an API process that died while waiting)
_READ_GRACE_S = 10
# Retry-After of a 503 when there is nothing better to say (no worker, a busy one)
RETRY_AFTER_S = 10
_RETRY_AFTER_MAX_S = 600


def enqueue_job(
    redis: Redis,
    settings: Settings,
    model: str,
    job_id: str,
    *,
    queue_name: str | None = None,
) -> bool:
    """Queue ledger job ``job_id`` (edit or rollback) for ``model``'s writer worker
    (on ``queue_name``, default the model's edit queue).

    Returns False when Redis holds an entry for the job already (the reconciler, or
    another API call, queued it): rq's ``unique`` enqueue refuses a second one.
    Raises :class:`Unavailable` when Redis does not answer."""
    queue = Queue(queue_name or settings.edit_queue(model), connection=redis)
    try:
        queue.enqueue(
            RUN_JOB,
            job_id,
            job_id=job_id,
            job_timeout=settings.job_timeout_s,
            description=f"{RUN_JOB}({job_id!r}) for {model}",
            unique=True,
        )
    except DuplicateJobError:
        log.info("job %s is in Redis already", job_id)
        return False
    except RedisError as exc:
        raise Unavailable("redis", f"job {job_id} could not be queued ({exc})") from exc
    log.info("enqueued job %s on %s", job_id, queue.name)
    return True


def waiting_ids(redis: Redis, queue_name: str) -> set[str]:
    """The job ids waiting in the rq queue ``queue_name``."""
    return set(Queue(queue_name, connection=redis).get_job_ids())


def entry_status(redis: Redis, job_id: str) -> str | None:
    """The status of the rq entry of ledger job ``job_id`` (``"queued"``,
    ``"started"``, ``"finished"`` ...), or None when Redis has none."""
    try:
        return RqJob.fetch(job_id, connection=redis).get_status().value
    except NoSuchJobError:
        return None


def drop_entry(redis: Redis, job_id: str) -> None:
    """Delete the rq entry of ledger job ``job_id`` if there is one (a stale entry
    would make the next unique enqueue a no-op)."""
    with contextlib.suppress(NoSuchJobError):
        RqJob.fetch(job_id, connection=redis).delete()


def enqueue_evaluation(redis: Redis, settings: Settings, model: str, job_id: str) -> bool:
    """Queue ledger evaluation job ``job_id`` on ``model``'s evaluation queue."""
    return enqueue_job(redis, settings, model, job_id, queue_name=settings.eval_queue(model))


def call_read(
    redis: Redis,
    settings: Settings,
    model: str,
    function: Literal["score", "generate"],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Run ``workers.jobs.<function>(**kwargs)`` on ``model``'s worker and return its result.

    With no worker serving the model (no live record in :mod:`service.presence`),
    refuses at once. Otherwise waits up to ``settings.sync_timeout_s`` (rounded up
    to whole seconds, as rq's blocking result read takes seconds): a worker that is
    still loading answers once it has loaded, one computing its statistics between
    two of their steps, a busy one after its current job. ``redis`` must read for
    longer than that wait (``XREAD BLOCK``; :func:`service.redis_clients.blocking_client`).
    A request nobody answered in time is deleted from the queue, so that no worker
    runs it later.
    """
    wait_s = read_wait_s(settings)
    worker = presence.model_worker(redis, settings.queue_prefix, model)
    if worker.state == presence.NO_WORKER:
        raise _unavailable(
            worker,
            f"no worker serves model {model!r}; start one (memedit worker --model {model})",
        )
    queue = Queue(settings.read_queue(model), connection=redis)
    try:
        job = queue.enqueue(
            READ_FUNCTIONS[function],
            kwargs=kwargs,
            job_timeout=wait_s,
            ttl=wait_s + _READ_GRACE_S,
            result_ttl=_READ_RESULT_TTL_S,
            failure_ttl=_READ_RESULT_TTL_S,
            description=f"{function} for {model}",
        )
        result = job.latest_result(timeout=wait_s)  # XREAD BLOCK wait_s
    except RedisError as exc:
        raise Unavailable("redis", f"the queue did not answer: {exc}") from exc
    if result is None:
        _discard(queue, job)
        worker = presence.model_worker(redis, settings.queue_prefix, model)
        raise _unavailable(
            worker,
            f"the worker of model {model!r} did not answer the {function} request within "
            f"{wait_s} s: {worker.describe()}",
        )
    if result.type == Result.Type.SUCCESSFUL:
        value = result.return_value
        invalid = value.get("invalid") if isinstance(value, dict) else None
        if invalid:  # a text too long in tokens for the model (workers/tokens.py)
            raise InvalidInput(invalid["field"], invalid["message"])
        if isinstance(value, dict) and value.get("unavailable"):  # start-up (workers/jobs/reads.py)
            worker = presence.model_worker(redis, settings.queue_prefix, model)
            raise _unavailable(worker, value["unavailable"])
        return value
    raise WorkerFailed(None, f"the worker failed the {function} request: {_exc_message(result)}")


def read_wait_s(settings: Settings) -> int:
    """How long the API waits for a read's answer, in the whole seconds rq takes."""
    return max(1, math.ceil(settings.sync_timeout_s))


def _unavailable(worker: presence.ModelWorker, message: str) -> WorkerUnavailable:
    return WorkerUnavailable(
        None, message, worker=worker.public(), retry_after_s=_retry_after(worker)
    )


def _retry_after(worker: presence.ModelWorker) -> int:
    """Seconds until the worker is likely to answer: for one computing its statistics,
    what is left at the pace so far; otherwise :data:`RETRY_AFTER_S`."""
    if worker.state == presence.Phase.statistics.value and worker.progress and worker.since:
        elapsed = max(0.0, time.time() - worker.since)
        left = elapsed * (1.0 - worker.progress) / worker.progress
        return int(min(_RETRY_AFTER_MAX_S, max(RETRY_AFTER_S, math.ceil(left))))
    return RETRY_AFTER_S


def _discard(queue: Queue, job: RqJob) -> None:
    try:
        job.delete()
    except (InvalidJobOperation, NoSuchJobError):
        queue.remove(job.id)  # its hash expired already; drop the id from the queue
    except RedisError:
        log.warning("could not delete timed-out job %s", job.id, exc_info=True)


def _exc_message(result: Result) -> str:
    if result.type == Result.Type.STOPPED:
        return "the job was stopped"
    lines = [line for line in (result.exc_string or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"
