"""The API under a real uvicorn server in a thread (one process, real sockets, its
own thread pool), as clients reach it in production: :func:`serve`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from service.api import create_app
from service.settings import Settings
from tests.memedit_up import free_port


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """Run ``create_app(settings)`` (lifespan included) on a free port; yield its URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
