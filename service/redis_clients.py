"""Redis clients with explicit socket timeouts, one kind per way a connection is used.

redis-py 8 gives every connection, TCP or Unix socket, a read timeout of 5 s unless
told otherwise; a read timeout shorter than a command's server-side block turns an
ordinary wait into ``TimeoutError``. So no client here takes the library's default:
each says how long the longest call made on it blocks, and reads for that long plus
:data:`BLOCK_MARGIN_S`.

| client | its longest blocking call | read timeout |
|---|---|---|
| commands: the API's enqueue, ping and worker-state reads; the CLI; the worker's heartbeat thread | none (single commands) | :data:`COMMAND_TIMEOUT_S` |
| the API's read path (:func:`service.queue.call_read`) | ``XREAD BLOCK`` for ``sync_timeout_s`` (rq's ``Job.latest_result``) | ``sync_timeout_s`` + margin |
| the worker (rq's loop, and the jobs it runs on that connection) | ``BLPOP`` for rq's ``dequeue_timeout`` = ``worker_ttl`` − 15 s | ``worker_ttl`` + margin |

rq's worker raises its connection pool's timeout itself when it is too short, but
only for connections opened afterwards; the worker's client is built long enough
from the start (:data:`WORKER_TTL_S`).
"""

from __future__ import annotations

from redis import Redis

# a connection attempt, and a command that does not block on the server
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0
# added to a call's own blocking time: the answer's transfer, a busy server
BLOCK_MARGIN_S = 10.0
# rq's worker_ttl, passed explicitly: rq blocks in BLPOP for worker_ttl - 15 s
WORKER_TTL_S = 420


def command_client(url: str) -> Redis:
    """A client for commands that return at once (no server-side blocking)."""
    return Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S
    )


def blocking_client(url: str, blocks_for_s: float) -> Redis:
    """A client whose longest call blocks on the server for ``blocks_for_s`` seconds."""
    return Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=max(COMMAND_TIMEOUT_S, blocks_for_s + BLOCK_MARGIN_S),
    )


def worker_client(url: str) -> Redis:
    """The rq worker's client: its loop blocks in BLPOP for up to ``WORKER_TTL_S - 15``."""
    return blocking_client(url, WORKER_TTL_S)


def read_timeout_of(client: Redis) -> float | None:
    """The read timeout that ``client``'s connections get (for tests and logs)."""
    return client.connection_pool.connection_kwargs.get("socket_timeout")
