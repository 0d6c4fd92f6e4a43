"""Which workers serve a model, and what each is doing: published in Redis.

A worker announces itself as soon as its process starts (``loading``: importing
torch, loading the weights, registering them in the ledger), then ``statistics``
with a progress fraction while it computes the layer statistics and the editors'
caches (it answers score/generate between steps when its weights are the ledger's
head), then ``ready``. Each worker's record is one JSON string under
``<prefix>:worker:<model>:<worker name>`` with a time to live, refreshed by a
heartbeat thread (:class:`Presence`); a worker that dies disappears within
:data:`TTL_S`. The set ``<prefix>:workers:<model>`` lists the names to look up.

The API reads the records (:func:`model_worker`): ``GET /v1/models`` shows them, a
read for a model without a worker answers 503 at once, and a read that timed out
answers 503 with the state. Redis only carries this; nothing here is in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# how often a worker refreshes its record, and how long a record outlives the last refresh
INTERVAL_S = 5.0
TTL_S = 20


class Phase(str, Enum):
    loading = "loading"
    statistics = "statistics"
    ready = "ready"


NO_WORKER = "no worker"
UNKNOWN = "unknown"  # Redis did not answer
# best first: the state a model shows when several workers serve it
_RANK = {Phase.ready.value: 0, Phase.statistics.value: 1, Phase.loading.value: 2}


def _record_key(prefix: str, model: str, worker: str) -> str:
    return f"{prefix}:worker:{model}:{worker}"


def _names_key(prefix: str, model: str) -> str:
    return f"{prefix}:workers:{model}"


@dataclass(frozen=True)
class ModelWorker:
    """The state of a model's workers: the most advanced one's, and how many there are."""

    state: str
    workers: int = 0
    progress: float | None = None
    message: str | None = None
    version: int | None = None
    since: float | None = None  # unix time the shown worker entered its state

    @property
    def ready(self) -> bool:
        return self.state == Phase.ready.value

    def describe(self) -> str:
        """``its worker is computing its statistics (40%)``, for messages."""
        if self.state == NO_WORKER:
            return "no worker serves it"
        if self.state == UNKNOWN:
            return "its worker's state is unknown (Redis did not answer)"
        if self.ready:
            return "its worker is busy (an edit or an evaluation)"
        doing = {
            Phase.loading.value: "loading",
            Phase.statistics.value: "computing its statistics",
        }[self.state]
        if self.progress is not None:
            doing += f" ({100 * self.progress:.0f}%)"
        if self.message:
            doing += f": {self.message}"
        return f"its worker is {doing}"

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "workers": self.workers,
            "progress": self.progress,
            "message": self.message,
            "version": self.version,
            "since": self.since,
        }


def model_worker(redis: Redis, prefix: str, model: str) -> ModelWorker:
    """The model's worker state from the live records (``no worker`` if none)."""
    try:
        names = sorted(n.decode() for n in redis.smembers(_names_key(prefix, model)))
        raw = redis.mget([_record_key(prefix, model, n) for n in names]) if names else []
    except RedisError as exc:
        log.warning("could not read the worker state of %s: %s", model, exc)
        return ModelWorker(state=UNKNOWN)
    records = []
    for name, value in zip(names, raw, strict=True):
        if value is None:
            _forget(redis, prefix, model, name)
            continue
        try:
            records.append(json.loads(value))
        except ValueError:
            log.warning("unreadable worker record %s of %s", name, model)
    live = [r for r in records if r.get("state") in _RANK]
    if not live:
        return ModelWorker(state=NO_WORKER)
    best = min(live, key=lambda r: (_RANK[r["state"]], -(r.get("progress") or 0.0)))
    return ModelWorker(
        state=best["state"],
        workers=len(live),
        progress=best.get("progress"),
        message=best.get("message"),
        version=best.get("version"),
        since=best.get("since"),
    )


def _forget(redis: Redis, prefix: str, model: str, name: str) -> None:
    with contextlib.suppress(RedisError):
        redis.srem(_names_key(prefix, model), name)


class Presence:
    """One worker's record: :meth:`set` publishes at once; :meth:`start` keeps it alive
    from a daemon thread (every :data:`INTERVAL_S`) until :meth:`stop`.

    ``version`` is asked at every publication for the version the worker's weights
    are at. The Redis client must be a command client (no blocking calls).
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        model: str,
        name: str,
        *,
        version: Callable[[], int | None] | None = None,
        ttl_s: int = TTL_S,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.redis, self.prefix, self.model, self.name = redis, prefix, model, name
        self.version = version
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self._record: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str | None:
        return self._record.get("state")

    def set(
        self, state: Phase, *, progress: float | None = None, message: str | None = None
    ) -> None:
        with self._lock:
            since = self._record.get("since") if self._record.get("state") == state.value else None
            self._record = {
                "state": state.value,
                "progress": None if progress is None else round(min(1.0, max(0.0, progress)), 4),
                "message": message,
                "since": since or time.time(),
            }
        self.publish()

    def publish(self) -> None:
        """Write the record now (errors are logged: the next heartbeat tries again)."""
        with self._lock:
            record = dict(self._record)
        if not record:
            return
        if self.version is not None:
            try:
                record["version"] = self.version()
            except Exception:  # the runtime may be between states; publish without it
                log.debug("no version for the presence record", exc_info=True)
        try:
            pipe = self.redis.pipeline()
            pipe.set(
                _record_key(self.prefix, self.model, self.name), json.dumps(record), ex=self.ttl_s
            )
            pipe.sadd(_names_key(self.prefix, self.model), self.name)
            pipe.execute()
        except RedisError as exc:
            log.warning("could not publish the state of worker %s: %s", self.name, exc)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._beat, name=f"presence-{self.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.publish()

    def stop(self) -> None:
        """Stop the heartbeat and withdraw the record."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
        try:
            self.redis.delete(_record_key(self.prefix, self.model, self.name))
            self.redis.srem(_names_key(self.prefix, self.model), self.name)
        except RedisError as exc:
            log.warning("could not withdraw the state of worker %s: %s", self.name, exc)
