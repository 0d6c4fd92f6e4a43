"""``memedit up`` as a user runs it: embedded PostgreSQL and Redis, the API and a
worker as child processes, over real HTTP; SIGTERM stops everything it started.

The model is a tiny LLaMA saved to a local folder (configured through
``MEMEDIT_MODELS``), so the test takes seconds; the real SmolLM2 goes through the
same code (see the README's walkthrough and tests/quality).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import tiny_model, word_tokenizer

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"memedit up exited ({proc.returncode}) waiting for {what}:\n"
                        f"{log.read_text()[-4000:]}")  # fmt: skip
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def test_up_serves_edits_and_stops_cleanly(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_model("llama", seed=0).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMEDIT_")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(
        MEMEDIT_MODELS=json.dumps({"tiny": {"source": str(folder)}}),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    log = tmp_path / "up.log"
    data = tmp_path / "data"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--model", "tiny",
             "--port", str(port), "--data-dir", str(data)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: "memedit is up at" in log.read_text(), 120, "the API", proc, log)
        _wait(lambda: "worker for tiny is ready" in log.read_text(), 300, "the worker", proc, log)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            body = {
                "method": "rome",
                "hparams": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0},
                "requests": [{"prompt": "{} was born in", "subject": "Mozart",
                              "target_new": "Rome", "target_true": "Vienna"}],
            }  # fmt: skip
            job_id = c.post("/v1/models/tiny/edits", json=body).json()["job_id"]
            job = _wait(
                lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                and j,
                120, "the edit", proc, log,
            )  # fmt: skip
            assert job["status"] == "succeeded", job
            assert c.post("/v1/models/tiny/generate", json={"prompt": "Mozart was born in",
                                                             "max_new_tokens": 2}).json()["version"] == 1  # fmt: skip

            rb = c.post("/v1/models/tiny/rollback", json={"to_version": 0}).json()["job_id"]
            _wait(lambda: c.get(f"/v1/jobs/{rb}").json()["status"] == "succeeded", 60,
                  "the rollback", proc, log)  # fmt: skip
            base, edit, rollback = c.get("/v1/models/tiny/versions").json()["items"]
            touched = edit["tensor_sha256"].keys()
            assert {k: rollback["tensor_sha256"][k] for k in touched} == {
                k: base["tensor_sha256"][k] for k in touched
            }
            assert c.get("/v1/models").json()[0]["head_version"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "stopping memedit" in text
    # nothing it started is left running: no process serves the data directory
    leftovers = subprocess.run(
        ["pgrep", "-af", str(data)], capture_output=True, text=True, check=False
    ).stdout
    assert leftovers.strip() == "", leftovers
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
