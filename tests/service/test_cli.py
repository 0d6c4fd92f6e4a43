"""``memedit up`` as a user runs it: embedded PostgreSQL and Redis, the API and a
worker as child processes, over real HTTP; SIGTERM stops everything it started.

The model is a tiny LLaMA saved to a local folder (configured through
``MEMEDIT_MODELS``), so the test takes seconds; the real SmolLM2 goes through the
same code (see the README's walkthrough and tests/quality).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.memedit_up import free_port, memedit_up, user_env
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.e2e


def _tiny_up(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """``memedit up`` of a tiny LLaMA in ``tmp_path``: argv, environment, data dir."""
    folder = save_tiny(tmp_path / "tiny")
    data = tmp_path / "data"
    env = user_env(
        MEMEDIT_MODELS=json.dumps({"tiny": {"source": str(folder)}}), OMP_NUM_THREADS="1"
    )
    argv = [sys.executable, "-m", "service.cli", "up", "--model", "tiny",
            "--port", str(free_port()), "--data-dir", str(data)]  # fmt: skip
    return argv, env, data


def test_up_serves_edits_and_stops_cleanly(tmp_path: Path) -> None:
    argv, env, data = _tiny_up(tmp_path)
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
            _exports_through_the_cli(up.url, env, tmp_path, edit)
            assert c.get("/v1/models").json()[0]["head_version"] == 3
        # the access log shows the user's requests, not up's own polls of /v1/models
        log = up.text()
        assert '"GET /v1/models/tiny/versions HTTP/1.1" 200' in log
        assert "poll=memedit-up" not in log
    # stopped (memedit_up asserted the clean exit and that nothing serves `data`)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.url}/healthz", timeout=2)


def _exports_through_the_cli(url: str, env: dict[str, str], tmp: Path, edit: dict[str, Any]) -> None:  # fmt: skip
    """``memedit export`` (patch and hf) of version 1 while the head is the rollback,
    ``memedit apply-patch`` onto the base folder with no service, and ``memedit
    import-patch`` back into the model: every tensor as version 1's, by hash."""
    from safetensors.torch import load_file

    from workers.runtime.hashing import tensor_sha256

    want = edit["tensor_sha256"]
    for fmt, out in (("patch", tmp / "v1.tar"), ("hf", tmp / "v1-hf")):
        done = _memedit("export", "--model", "tiny", "--version", "1", "--format", fmt,
                        "--out", str(out), "--url", url, env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"version 1 of tiny as {fmt}" in done.stdout
    weights = load_file(tmp / "v1-hf" / "model.safetensors")
    assert {n: tensor_sha256(weights[n]) for n in want} == want
    applied = _memedit("apply-patch", str(tmp / "v1.tar"), "--base", str(tmp / "tiny"),
                       "--out", str(tmp / "applied"), env=env)  # fmt: skip
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "hash-equal to the manifest" in applied.stdout
    weights = load_file(tmp / "applied" / "model.safetensors")
    assert {n: tensor_sha256(weights[n]) for n in want} == want
    # a base the patch was not made against is refused, and nothing is written
    save_tiny(tmp / "other", seed=1)
    wrong = _memedit("apply-patch", str(tmp / "v1.tar"), "--base", str(tmp / "other"),
                     "--out", str(tmp / "wrong"), env=env)  # fmt: skip
    assert wrong.returncode != 0 and "not the one the patch was made against" in wrong.stderr
    assert not (tmp / "wrong").exists()
    imported = _memedit("import-patch", str(tmp / "v1.tar"), "--model", "tiny", "--url", url,
                        env=env)  # fmt: skip
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported as version [3] of tiny with 1 edit(s)" in imported.stdout
    with httpx.Client(base_url=url, timeout=30) as c:
        v3 = c.get("/v1/models/tiny/versions/3").json()
    assert v3["kind"] == "import" and {n: v3["tensor_sha256"][n] for n in want} == want


def _memedit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_keys_on_the_embedded_ledger_while_up_runs(tmp_path: Path) -> None:
    """``memedit keys`` finds the ledger that ``up`` keeps in ``--data-dir`` (no
    DATABASE_URL), and leaves ``up``'s PostgreSQL running when it is done."""
    argv, env, data = _tiny_up(tmp_path)
    # a key made before `up` runs (the command starts the embedded ledger itself)
    first = _memedit("keys", "create", "--name", "first", "--scope", "admin",
                     "--data-dir", str(data), env=env)  # fmt: skip
    assert first.returncode == 0, first.stderr
    with memedit_up(argv, env=env, log=tmp_path / "up.log", data_dir=data, stop_timeout_s=60) as up:
        # up follows the worker's start-up without a key (GET /healthz/workers is open)
        up.wait_for(lambda: "worker for tiny is ready" in up.text(), 300, "the worker")
        with httpx.Client(base_url=up.url, timeout=30) as c:
            assert c.get("/v1/models").status_code == 401
            revoked = _memedit("keys", "revoke", "first", "--data-dir", str(data), env=env)
            assert revoked.returncode == 0, revoked.stderr
            assert c.get("/v1/models").status_code == 200  # no key yet: loopback is served
            made = _memedit("keys", "create", "--name", "ops", "--scope", "reads",
                            "--data-dir", str(data), env=env)  # fmt: skip
            assert made.returncode == 0, made.stderr
            secret = made.stdout.strip().splitlines()[-1]
            assert secret.startswith("mk_")
            assert c.get("/v1/models").status_code == 401
            auth = {"Authorization": f"Bearer {secret}"}
            assert c.get("/v1/models", headers=auth).status_code == 200
            denied = c.post("/v1/models/tiny/rollback", json={"to_version": 0}, headers=auth)
            assert denied.status_code == 403
            listed = _memedit("keys", "list", "--data-dir", str(data), env=env)
            assert "ops" in listed.stdout and "first" in listed.stdout
            assert secret not in listed.stdout
            gone = _memedit("keys", "revoke", "ops", "--data-dir", str(data), env=env)
            assert gone.returncode == 0, gone.stderr
            assert c.get("/v1/models", headers=auth).status_code == 200  # no key left
            assert c.get("/v1/models").status_code == 200
            assert c.get("/healthz").json() == {"status": "ok"}


def test_up_refuses_a_public_host_without_keys(tmp_path: Path) -> None:
    env = user_env(OMP_NUM_THREADS="1")
    data = tmp_path / "data"
    done = _memedit("up", "--host", "0.0.0.0", "--port", str(free_port()),
                    "--data-dir", str(data), env=env)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--insecure-no-auth" in done.stderr and "memedit keys create" in done.stderr
