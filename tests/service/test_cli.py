"""``memedit up`` as a user runs it: embedded PostgreSQL and Redis, the API and a
worker as child processes, over real HTTP; SIGTERM stops everything it started.

The model is a tiny LLaMA saved to a local folder (configured through
``MEMEDIT_MODELS``), so the test takes seconds; the real SmolLM2 goes through the
same code (see the README's walkthrough and tests/quality).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.memedit_up import free_port, memedit_up, user_env
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.e2e


def test_up_serves_edits_and_stops_cleanly(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny")
    data = tmp_path / "data"
    env = user_env(
        MEMEDIT_MODELS=json.dumps({"tiny": {"source": str(folder)}}), OMP_NUM_THREADS="1"
    )
    argv = [sys.executable, "-m", "service.cli", "up", "--model", "tiny",
            "--port", str(free_port()), "--data-dir", str(data)]  # fmt: skip
    with memedit_up(argv, env=env, log=tmp_path / "up.log", data_dir=data, stop_timeout_s=60) as up:
        up.wait_for(lambda: "memedit is up at" in up.text(), 120, "the API")
        up.wait_for(lambda: "worker for tiny is ready" in up.text(), 300, "the worker")
        with httpx.Client(base_url=up.url, timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            body = {
                "method": "rome",
                "hparams": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0},
                "requests": [{"prompt": "{} was born in", "subject": "Mozart",
                              "target_new": "Rome", "target_true": "Vienna"}],
            }  # fmt: skip
            job_id = c.post("/v1/models/tiny/edits", json=body).json()["job_id"]
            job = up.wait_for(
                lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                and j,
                120, "the edit",
            )  # fmt: skip
            assert job["status"] == "succeeded", job
            assert c.post("/v1/models/tiny/generate", json={"prompt": "Mozart was born in",
                                                             "max_new_tokens": 2}).json()["version"] == 1  # fmt: skip

            rb = c.post("/v1/models/tiny/rollback", json={"to_version": 0}).json()["job_id"]
            up.wait_for(lambda: c.get(f"/v1/jobs/{rb}").json()["status"] == "succeeded", 60,
                        "the rollback")  # fmt: skip
            base, edit, rollback = c.get("/v1/models/tiny/versions").json()["items"]
            touched = edit["tensor_sha256"].keys()
            assert {k: rollback["tensor_sha256"][k] for k in touched} == {
                k: base["tensor_sha256"][k] for k in touched
            }
            assert c.get("/v1/models").json()[0]["head_version"] == 2
        # the access log shows the user's requests, not up's own polls of /v1/models
        log = up.text()
        assert '"GET /v1/models/tiny/versions HTTP/1.1" 200' in log
        assert "poll=memedit-up" not in log
    # stopped (memedit_up asserted the clean exit and that nothing serves `data`)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.url}/healthz", timeout=2)
