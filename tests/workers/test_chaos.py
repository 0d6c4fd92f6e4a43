"""Chaos, bounded, on the tiny model: three clients stream single edits (each POST
retried with its ``Idempotency-Key`` until it is accepted) while the worker is
SIGKILLed three times, PostgreSQL is restarted once and Redis is flushed once.

The ledger is an embedded PostgreSQL of the test's own (pgserver: it can be stopped
and started again), the API a real uvicorn server, the workers real ``memedit
worker`` processes. Checked afterwards: every edit ended applied, none stuck and
none applied twice, versions contiguous; the jobs that waited through the flush
finished within 60 s under the same worker; the head's tensor hashes equal those of
an uninterrupted run of the same requests in the same order; a rollback to a random
version is hash-exact.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import embedded
from service.ledger.sessions import create_ledger_engine
from service.ledger.tables import Edit, EditStatus, Job, JobStatus, Version
from service.migrate import upgrade_to_head
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.served import serve
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL, TWIN = "tiny", "twin"
CLIENTS, PER_CLIENT = 3, 8
FAST = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16,
        "v_num_grad_steps": 5}  # fmt: skip
NAMES = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin", "Tolstoy", "Homer",
         "Dante", "Ada", "Alan", "John", "Mary", "Marie", "Peter", "Anna"]  # fmt: skip
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo", "Vienna", "Lisbon", "Athens"]


class Ledger:
    """An embedded PostgreSQL that the test may restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server, self.url = embedded.start_postgres(root)
        upgrade_to_head(self.url)

    def restart(self, down_s: float) -> None:
        self.server.cleanup()  # stops it: every connection is cut
        time.sleep(down_s)
        self.server, url = embedded.start_postgres(self.root)
        assert url == self.url

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    own = Ledger(tmp_path / "pg")
    try:
        yield own
    finally:
        own.close()


@pytest.fixture
def chaos_settings(
    model_settings: Callable[..., Settings], tiny_dir: Path, ledger: Ledger, redis_conn: Redis
) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), max_batch=1, guard=GuardPolicy(enabled=False))
    settings = model_settings(MODEL, spec, database_url=ledger.url, reconcile_interval_s=1.0,
                              sync_timeout_s=60.0, rate_limit_per_minute=0)  # fmt: skip
    return settings.model_copy(update={"models": {MODEL: spec, TWIN: spec}})


def _request(i: int) -> dict[str, Any]:
    subject = f"{NAMES[i % len(NAMES)]} {NAMES[(i // len(NAMES) + 3) % len(NAMES)]}"
    return {"prompt": "{} was born in", "subject": subject, "target_new": CITIES[i % len(CITIES)]}


def _body(req: dict[str, Any]) -> dict[str, Any]:
    return {"method": "memit", "hparams": FAST, "requests": [req], "batching": "alone"}


def _post_until_accepted(c: httpx.Client, model: str, body: dict[str, Any], key: str) -> str:
    """POST with an Idempotency-Key, retrying 5xx and dropped connections (a client
    that retries safely): the job id."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            r = c.post(f"/v1/models/{model}/edits", json=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                return str(r.json()["job_id"])
            assert r.status_code >= 500, r.text
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{key} was never accepted")


class Workers:
    """The model's ``memedit worker``, restarted by the test after each kill."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings, self.logs, self.n = settings, logs, 0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.n += 1
        return harness.spawn_worker(self.settings, MODEL, self.logs / f"worker{self.n}.log")

    def kill_and_restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = self._spawn()

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.logs.glob("*.log"))
        )


def test_edits_survive_kills_a_flush_and_a_postgres_restart(
    chaos_settings: Settings,
    ledger: Ledger,
    redis_conn: Redis,
    tmp_path: Path,
    measurements: list[str],
) -> None:
    engine = create_ledger_engine(ledger.url)
    logs = tmp_path / "logs"
    logs.mkdir()

    def count(*where: Any) -> int:
        try:
            with Session(engine) as s:
                return len(list(s.scalars(select(Job.id).where(*where))))
        except Exception:  # the ledger is down for a moment
            return -1

    def wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{workers.tails()}"
            time.sleep(0.1)

    with serve(chaos_settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        workers = Workers(chaos_settings, logs)
        accepted: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            for k in range(PER_CLIENT):
                job = _post_until_accepted(
                    c, MODEL, _body(_request(n * PER_CLIENT + k)), f"c{n}-{k}"
                )
                with lock:
                    accepted.append(job)
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        try:
            for t in threads:
                t.start()
            done = lambda: count(Job.status == JobStatus.succeeded)  # noqa: E731
            for milestone in (2, 5, 8):  # three kills, each after more versions
                wait(lambda m=milestone: done() >= m, 120, f"{milestone} jobs")
                workers.kill_and_restart()
            wait(lambda: done() >= 10, 120, "10 jobs")
            ledger.restart(down_s=2.0)
            wait(lambda: done() >= 12, 120, "jobs after the restart")
            for t in threads:
                t.join(timeout=120)
            assert len(accepted) == CLIENTS * PER_CLIENT
            # the flush, last, under a live worker that is not restarted again
            survivor = workers.proc
            redis_conn.flushdb()
            flushed = time.monotonic()
            wait(lambda: done() == len(accepted), 60, "every job after the flush")
            after_flush_s = time.monotonic() - flushed
            assert survivor.poll() is None and workers.proc is survivor

            with Session(engine) as s:
                edits = list(s.scalars(select(Edit).where(Edit.job_id.in_(accepted))))
                numbers = list(s.scalars(select(Version.number).where(
                    Version.model_id == edits[0].model_id).order_by(Version.number)))  # fmt: skip
                unfinished = count(Job.status.in_([JobStatus.queued, JobStatus.running]))
            assert unfinished == 0
            assert {e.status for e in edits} == {EditStatus.applied}, [
                (e.subject, e.status, e.reason) for e in edits if e.status is not EditStatus.applied
            ]
            assert numbers == list(range(len(edits) + 1))  # contiguous, each edit once
            by_version = sorted(edits, key=lambda e: e.version_id or 0)
            versions = harness.all_versions(c, MODEL)
            assert len({e.version_id for e in edits}) == len(edits)

            # the same requests in the same order, uninterrupted, on a twin model
            twin = harness.spawn_worker(chaos_settings, TWIN, logs / "twin.log")
            try:
                twin_jobs = []
                for i, e in enumerate(by_version):
                    req = {"prompt": e.prompt, "subject": e.subject, "target_new": e.target_new}
                    twin_jobs.append(_post_until_accepted(c, TWIN, _body(req), f"twin-{i}"))
                wait(lambda: count(Job.id.in_(twin_jobs), Job.status == JobStatus.succeeded)
                     == len(twin_jobs), 120, "the twin's jobs")  # fmt: skip
            finally:
                harness.stop(twin)
            twin_head = harness.all_versions(c, TWIN)[-1]
            assert versions[-1]["tensor_sha256"] == twin_head["tensor_sha256"]

            # a rollback to a random version is hash-exact
            k = random.Random(13).randrange(0, len(edits))
            rb = c.post(f"/v1/models/{MODEL}/rollback", json={"to_version": k}).json()["job_id"]
            wait(lambda: count(Job.id == rb, Job.status == JobStatus.succeeded) == 1, 60,
                 "the rollback")  # fmt: skip
            head = harness.all_versions(c, MODEL)[-1]
            base, target = versions[0]["tensor_sha256"], versions[k]["tensor_sha256"]
            assert head["tensor_sha256"], head
            for name, sha in head["tensor_sha256"].items():
                assert sha == target.get(name, base.get(name)), (k, name)
        finally:
            for t in threads:
                t.join(timeout=5)
            harness.stop(workers.proc)
            engine.dispose()
    measurements.append(
        f"chaos: {len(accepted)} edits from {CLIENTS} clients, {workers.n - 1} worker kills, "
        f"1 PostgreSQL restart, 1 Redis flush; the jobs left at the flush finished "
        f"{after_flush_s:.1f} s after it; head equals the uninterrupted twin"
    )
