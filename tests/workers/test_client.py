"""The Python client (service/client.py) and the operator's CLI commands
(service/cli_client.py) against the API under a real uvicorn server, with a tiny
model's worker draining its queues in the test's main thread while the client waits
in another."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis import Redis
from typer.testing import CliRunner

from service.cli import app
from service.client import ApiError, AsyncClient, Client
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.served import serve
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL = "tiny"
FAST = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16}
SUBJECTS = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin"]


@pytest.fixture
def settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), guard=GuardPolicy(enabled=False), max_batch=4)
    return model_settings(MODEL, spec, sync_timeout_s=60.0)


@pytest.fixture
def url(settings: Settings, clean_db: object, redis_conn: Redis) -> Iterator[str]:
    with serve(settings) as base:
        yield base


def while_draining(settings: Settings, redis: Redis, work: Callable[[], Any]) -> Any:
    return harness.while_draining(MODEL, settings, redis, work)


def request(i: int) -> dict[str, Any]:
    return {"prompt": "{} was born in", "subject": SUBJECTS[i], "target_new": "Rome",
            "target_true": "Vienna"}  # fmt: skip


def test_the_client_edits_waits_follows_reads_and_raises(
    url: str, settings: Settings, redis_conn: Redis
) -> None:
    harness.start_worker(MODEL, settings)
    with Client(url) as memedit:
        job = memedit.edit(MODEL, [request(0), request(1)], method="memit", hparams=FAST)
        done = while_draining(settings, redis_conn, job.wait)
        assert done.status.value == "succeeded" and done.result["versions"] == [1]
        events = [e.kind for e in job.events()]
        assert events[0] == "status" and "version" in events and events[-1] == "status"
        edits = memedit.edits(MODEL, subject="moz")
        assert [e.subject for e in edits.items] == ["Mozart"]
        assert memedit.edit_of(MODEL, edits.items[0].id).version == 1
        assert memedit.version(MODEL, 1).edits[0].subject in ("Mozart", "Picasso")
        assert memedit.series(MODEL, "drift").x == [0, 1]
        assert memedit.jobs(model=MODEL).items[0].id == job.id
        score = while_draining(settings, redis_conn, lambda: memedit.score(
            MODEL, ["Mozart was born in"], ["Rome"], version=0))  # fmt: skip
        assert score.version == 0 and len(score.logprobs) == 1
        back = memedit.rollback(MODEL, 0)
        assert while_draining(settings, redis_conn, back.wait).result["versions"] == [2]
        assert "memedit_head_version" in memedit.metrics()
        with pytest.raises(ApiError) as missing:
            memedit.edit("nope", [request(0)])
        assert missing.value.status == 404 and missing.value.field == "model"

    async def go() -> tuple[list[str], str, list[str], int]:
        async with AsyncClient(url) as memedit:
            models = await memedit.models()
            jobs = await memedit.jobs(limit=1)
            kinds = [e.kind async for e in memedit.job_events(jobs.items[0].id)]
            seen = [e async for e in memedit.model_events(MODEL, after=0, follow=False)]
            return [m.name for m in models], jobs.items[0].kind.value, kinds, len(seen)

    names, kind, kinds, n_events = anyio.run(go)
    assert names == [MODEL] and kind == "rollback"
    assert kinds[0] == "status" and kinds[-1] == "status" and "version" in kinds
    assert n_events > len(kinds)  # the model's stream holds both jobs' events


def test_the_cli_edits_a_file_with_progress_and_lists(
    url: str, settings: Settings, redis_conn: Redis, tmp_path: Path
) -> None:
    harness.start_worker(MODEL, settings)
    records = tmp_path / "facts.jsonl"
    with records.open("w") as f:
        for i, subject in enumerate(SUBJECTS):  # CounterFact's shape
            f.write(json.dumps({"case_id": i, "requested_rewrite": {
                "prompt": "{} was born in", "subject": subject, "target_new": {"str": "Rome"},
                "target_true": {"str": "Vienna"}}, "paraphrase_prompts": [f"{subject} lives in"],
                "neighborhood_prompts": []}) + "\n")  # fmt: skip
    runner = CliRunner()
    common = ["--url", url, "--model", MODEL]
    result = while_draining(settings, redis_conn, lambda: runner.invoke(app, [
        "edit", "--file", str(records), "--method", "memit", "--hparams", json.dumps(FAST),
        "--chunk", "4", "--json", *common]))  # fmt: skip
    assert result.exit_code == 0, (result.output, traceback.format_exception(*result.exc_info))
    summary = json.loads(result.stdout)
    assert summary["jobs"] == 2 and summary["applied"] == 6 and summary["jobs_failed"] == 0
    assert summary["versions"] == [1, 2] and 0 <= summary["mean"]["efficacy"] <= 1

    listed = runner.invoke(app, ["jobs", "list", "--url", url, "--json"])
    jobs = json.loads(listed.stdout)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    table = runner.invoke(app, ["jobs", "list", "--url", url])
    assert table.stdout.splitlines()[0].split()[:4] == ["job", "kind", "model", "status"]
    watched = runner.invoke(app, ["jobs", "watch", jobs[0]["id"], "--url", url])
    assert watched.exit_code == 0 and "succeeded" in watched.stdout.splitlines()[-1]
    versions = runner.invoke(app, ["versions", *common])
    assert [line.split()[0] for line in versions.stdout.splitlines()[1:]] == ["0", "1", "2"]
    rolled = while_draining(settings, redis_conn, lambda: runner.invoke(app, [
        "rollback", "--to", "1", *common]))  # fmt: skip
    assert rolled.exit_code == 0 and "version [3]" in rolled.stdout, rolled.output
    ev = while_draining(settings, redis_conn, lambda: runner.invoke(app, [
        "eval", "--suite", "retention", "--json", *common]))  # fmt: skip
    assert ev.exit_code == 0 and json.loads(ev.stdout)["version"] == 3, ev.output
    bad = runner.invoke(app, ["edit", "--subject", "x", *common])
    assert bad.exit_code == 2
    cancel = runner.invoke(app, ["jobs", "cancel", jobs[0]["id"], "--url", url])
    assert cancel.exit_code == 1 and "409" in cancel.output
