"""Run ``memedit up`` as a child process the way a user does, for the tiers that test
that path (tests/readme, tests/service/test_cli.py): a clean environment, a log file,
a free port, and a stop by SIGTERM that must leave nothing running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment without memedit's settings and the servers' URLs
    (``up`` then starts its embedded ones), offline, with ``extra`` set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMEDIT_")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


class Up:
    """A running ``memedit up``: its process, its log, its URL."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll ``predicate`` until it returns something true; fail with the log's tail
        if ``up`` exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"memedit up exited ({self.proc.returncode}) waiting for {what}:\n"
                            f"{self.text()[-6000:]}")  # fmt: skip
            value = predicate()
            if value:
                return value
            time.sleep(0.3)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.text()[-6000:]}")


@contextmanager
def memedit_up(
    argv: list[str], *, env: dict[str, str], log: Path, data_dir: Path, cwd: Path | None = None,
    stop_timeout_s: float = 90,
) -> Iterator[Up]:  # fmt: skip
    """Start ``argv`` (a ``memedit up`` command line ending in ``--port N``), yield it;
    at the end stop it with SIGTERM and assert that it exits 0, says it stopped, and
    leaves no process that serves ``data_dir`` (the embedded servers)."""
    port = argv[argv.index("--port") + 1]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    running = Up(proc, log, f"http://127.0.0.1:{port}")
    try:
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = running.text()
    assert code == 0, text[-6000:]
    assert "stopping memedit" in text
    leftovers = subprocess.run(
        ["pgrep", "-af", str(data_dir)], capture_output=True, text=True, check=False
    ).stdout
    assert leftovers.strip() == "", leftovers
