"""Every Redis client reads for longer than the longest call made on it blocks
(service/redis_clients.py). redis-py 8 gives a connection a 5 s read timeout by
default; these check the clients memedit builds, on the real Redis."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from rq import Queue

from service import queue
from service.redis_clients import (
    BLOCK_MARGIN_S,
    COMMAND_TIMEOUT_S,
    WORKER_TTL_S,
    blocking_client,
    command_client,
    read_timeout_of,
    worker_client,
)
from service.settings import Settings
from workers.worker import StartingWorker


def test_each_client_reads_for_longer_than_its_calls_block(redis_url: str) -> None:
    assert read_timeout_of(command_client(redis_url)) == COMMAND_TIMEOUT_S
    assert read_timeout_of(blocking_client(redis_url, 120)) == 120 + BLOCK_MARGIN_S
    conn = worker_client(redis_url)
    worker = StartingWorker(
        [Queue("memedit-test:q", connection=conn)],
        startup=iter(()),
        read_queue=Queue("memedit-test:q", connection=conn),
        reads_ok=True,
        connection=conn,
        worker_ttl=WORKER_TTL_S,
    )
    # rq's loop blocks in BLPOP for dequeue_timeout; the client outlasts it
    assert read_timeout_of(conn) > worker.dequeue_timeout
    # ...and rq left it as built (it raises a pool's timeout only when too short)
    assert read_timeout_of(worker.connection) == WORKER_TTL_S + BLOCK_MARGIN_S


def test_the_api_reads_for_longer_than_it_waits_for_a_worker(client: TestClient) -> None:
    settings: Settings = client.app.state.settings
    wait = queue.read_wait_s(settings)
    assert read_timeout_of(client.app.state.reads_redis) > wait
    assert read_timeout_of(client.app.state.redis) == COMMAND_TIMEOUT_S


def test_a_worker_client_blocks_past_the_command_timeout(redis_url: str) -> None:
    """A BLPOP longer than 5 s returns empty-handed instead of timing out."""
    conn = worker_client(redis_url)
    block_s = int(COMMAND_TIMEOUT_S) + 2
    started = time.monotonic()
    assert conn.blpop(["memedit-test:nothing-here"], timeout=block_s) is None
    assert time.monotonic() - started >= block_s - 0.5
