"""The chaos run shared by ``bench/chaos.py`` and ``tests/workers/test_chaos.py``:
clients stream single-edit requests (each POST retried with its ``Idempotency-Key``
until accepted) to a real API while the model's ``memedit worker`` is SIGKILLed and
restarted, PostgreSQL (an embedded one, so it can be restarted) is stopped and
started, and Redis is flushed, at given numbers of finished jobs. Afterwards the same
requests are applied in the ledger's order by an uninterrupted worker of a twin
model (same base), and a rollback to a random version is checked.

Nothing here asserts: :func:`run` returns a :class:`ChaosResult` that the test
asserts on and the benchmark reports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import embedded
from service.api import create_app
from service.ledger.sessions import create_ledger_engine
from service.ledger.tables import Edit, Job, JobStatus, Version
from service.migrate import upgrade_to_head
from service.settings import Settings


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The API (``create_app(settings)``, lifespan included) under a real uvicorn
    server in a thread, on a free port; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Ledger:
    """An embedded PostgreSQL in ``root`` that can be restarted (every connection
    is cut; the URL stays the same)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server, self.url = embedded.start_postgres(root)
        upgrade_to_head(self.url)

    def restart(self, down_s: float) -> None:
        self.server.cleanup()
        time.sleep(down_s)
        self.server, url = embedded.start_postgres(self.root)
        if url != self.url:
            raise RuntimeError(f"the restarted PostgreSQL moved: {url} != {self.url}")

    def close(self) -> None:
        self.server.cleanup()


def worker_env(settings: Settings, model: str, **extra: str) -> dict[str, str]:
    """The environment of a ``memedit worker`` for ``model`` with ``settings`` (this
    process's environment without memedit's own variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMEDIT_")}
    env.update(
        MEMEDIT_DATABASE_URL=settings.database_url,
        MEMEDIT_REDIS_URL=settings.redis_url,
        MEMEDIT_MODELS=json.dumps({model: settings.models[model].model_dump()}),
        MEMEDIT_ARTIFACT_DIR=str(settings.artifact_dir),
        MEMEDIT_CACHE_DIR=str(settings.effective_cache_dir),
        MEMEDIT_WARM_STATISTICS=str(settings.warm_statistics).lower(),
        MEMEDIT_RECONCILE_INTERVAL_S=str(settings.reconcile_interval_s),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def spawn_worker(
    settings: Settings, model: str, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """Start ``memedit worker --model MODEL`` as a child process logging to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--model", model],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env(settings, model, **extra),
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit in ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post_until_accepted(
    c: httpx.Client, model: str, body: dict[str, Any], key: str, timeout_s: float = 300
) -> str:
    """POST an edit with an Idempotency-Key, retrying 5xx and dropped connections (a
    client that retries safely); the job id. A 4xx other than 429 is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = c.post(f"/v1/models/{model}/edits", json=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                return str(r.json()["job_id"])
            if r.status_code < 500 and r.status_code != 429:
                raise RuntimeError(f"{key}: {r.status_code} {r.text}")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{key} was never accepted")


@dataclass
class Schedule:
    """When to strike, as numbers of succeeded jobs: each entry of ``kills`` SIGKILLs
    the worker (and starts a new one), of ``restarts`` stops PostgreSQL for
    ``down_s``, of ``flushes`` flushes Redis. The last flush comes after every other
    fault, so that the jobs it loses are recovered by the same worker."""

    kills: Sequence[int] = ()
    restarts: Sequence[int] = ()
    flushes: Sequence[int] = ()
    down_s: float = 2.0


@dataclass
class ChaosResult:
    accepted: list[str]
    statuses: dict[str, int]  # edit status -> count
    unfinished_jobs: int
    version_numbers: list[int]
    distinct_versions: int
    head_sha256: dict[str, str]
    twin_sha256: dict[str, str]
    rollback_to: int
    rollback_exact: bool
    after_last_flush_s: float | None
    kills: int
    restarts: int
    flushes: int
    seconds: float
    worker_pids_after_flush: tuple[int, int] = (0, 0)
    events: list[str] = field(default_factory=list)


class _Workers:
    def __init__(self, settings: Settings, model: str, logs: Path) -> None:
        self.settings, self.model, self.logs, self.n = settings, model, logs, 0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.n += 1
        return spawn_worker(self.settings, self.model, self.logs / f"worker{self.n}.log")

    def kill_and_restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = self._spawn()

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


def run(
    url: str,
    settings: Settings,
    ledger: Ledger,
    flush: Callable[[], Any],
    requests: Sequence[dict[str, Any]],
    body: Callable[[dict[str, Any]], dict[str, Any]],
    schedule: Schedule,
    logs: Path,
    *,
    model: str,
    twin: str,
    clients: int = 3,
    timeout_s: float = 600,
    progress: Callable[[str], None] = lambda message: None,
) -> ChaosResult:
    """The chaos run against the API at ``url`` (``settings`` serve ``model`` and
    ``twin`` on ``ledger``); ``requests[i]`` is sent by client ``i % clients``."""
    started = time.monotonic()
    engine = create_ledger_engine(ledger.url)
    logs.mkdir(parents=True, exist_ok=True)
    workers = _Workers(settings, model, logs)
    events: list[str] = []

    def count(*where: Any) -> int:
        try:
            with Session(engine) as s:
                return len(list(s.scalars(select(Job.id).where(*where))))
        except Exception:  # the ledger is down for a moment
            return -1

    def done() -> int:
        return count(Job.status == JobStatus.succeeded)

    def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}\n{workers.tails()}")
            time.sleep(0.1)

    accepted: list[str | None] = [None] * len(requests)
    errors: list[BaseException] = []

    def client(n: int, c: httpx.Client) -> None:
        try:
            for i in range(n, len(requests), clients):
                accepted[i] = post_until_accepted(c, model, body(requests[i]), f"c{n}-{i}")
                time.sleep(0.02)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    strikes = sorted(
        [(k, "kill") for k in schedule.kills]
        + [(k, "restart") for k in schedule.restarts]
        + [(k, "flush") for k in schedule.flushes]
    )
    after_flush_s = None
    with httpx.Client(base_url=url, timeout=60) as c:
        threads = [threading.Thread(target=client, args=(n, c)) for n in range(clients)]
        try:
            for t in threads:
                t.start()
            for at, what in strikes:
                wait(lambda at=at: done() >= at, f"{at} jobs")
                if what == "kill":
                    workers.kill_and_restart()
                elif what == "restart":
                    ledger.restart(schedule.down_s)
                else:
                    flush()
                    flushed_at = time.monotonic()
                events.append(f"{what} at {at} jobs ({time.monotonic() - started:.1f} s)")
                progress(events[-1])
            for t in threads:
                t.join(timeout=timeout_s)
            if errors:
                raise errors[0]
            jobs = [j for j in accepted if j is not None]
            survivor = workers.proc
            wait(lambda: count(Job.id.in_(jobs), Job.status == JobStatus.succeeded) == len(jobs)
                 or count(Job.id.in_(jobs), Job.status.in_([JobStatus.queued,
                                                             JobStatus.running])) == 0,
                 "every job")  # fmt: skip
            if schedule.flushes:
                after_flush_s = time.monotonic() - flushed_at
            pids = (survivor.pid, workers.proc.pid)
            progress(f"all {len(jobs)} jobs finished ({time.monotonic() - started:.1f} s)")

            with Session(engine) as s:
                edits = list(s.scalars(select(Edit).where(Edit.job_id.in_(jobs))))
                model_id = edits[0].model_id
                numbers = list(s.scalars(select(Version.number).where(
                    Version.model_id == model_id).order_by(Version.number)))  # fmt: skip
                unfinished = count(Job.status.in_([JobStatus.queued, JobStatus.running]))
            statuses: dict[str, int] = {}
            for e in edits:
                statuses[e.status.value] = statuses.get(e.status.value, 0) + 1
            versions = all_versions(c, model)

            # the same requests in the ledger's order, uninterrupted, on the twin
            in_order = sorted((e for e in edits if e.version_id is not None),
                              key=lambda e: e.version_id or 0)  # fmt: skip
            twin_proc = spawn_worker(settings, twin, logs / "twin.log")
            try:
                twin_jobs = [
                    post_until_accepted(c, twin, body({"prompt": e.prompt, "subject": e.subject,
                                                       "target_new": e.target_new,
                                                       "target_true": e.target_true}),
                                        f"twin-{i}")
                    for i, e in enumerate(in_order)
                ]  # fmt: skip
                wait(lambda: count(Job.id.in_(twin_jobs), Job.status == JobStatus.succeeded)
                     == len(twin_jobs), "the twin's jobs")  # fmt: skip
            finally:
                stop(twin_proc)
            twin_head = all_versions(c, twin)[-1]["tensor_sha256"]
            progress(f"the uninterrupted twin applied {len(in_order)} edits")

            # a rollback to a random version, checked against that version's hashes
            k = random.Random(13).randrange(0, len(versions))
            rb = c.post(f"/v1/models/{model}/rollback", json={"to_version": k})
            rb.raise_for_status()
            rb_id = rb.json()["job_id"]
            wait(lambda: count(Job.id == rb_id, Job.status == JobStatus.succeeded) == 1,
                 "the rollback")  # fmt: skip
            head = all_versions(c, model)[-1]["tensor_sha256"]
            base, target = versions[0]["tensor_sha256"], versions[k]["tensor_sha256"]
            exact = bool(head) and all(
                sha == target.get(name, base.get(name)) for name, sha in head.items()
            )
        finally:
            for t in threads:
                t.join(timeout=5)
            stop(workers.proc)
            engine.dispose()
    return ChaosResult(
        accepted=jobs,
        statuses=statuses,
        unfinished_jobs=unfinished,
        version_numbers=numbers,
        distinct_versions=len({e.version_id for e in edits if e.version_id is not None}),
        head_sha256=versions[-1]["tensor_sha256"],
        twin_sha256=twin_head,
        rollback_to=k,
        rollback_exact=exact,
        after_last_flush_s=after_flush_s,
        kills=len(schedule.kills),
        restarts=len(schedule.restarts),
        flushes=len(schedule.flushes),
        seconds=time.monotonic() - started,
        worker_pids_after_flush=pids,
        events=events,
    )


def all_versions(c: Any, model: str) -> list[dict[str, Any]]:
    """Every version of ``model``, page by page (``c``: an httpx or test client)."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = c.get(f"/v1/models/{model}/versions", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items
