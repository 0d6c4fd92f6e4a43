"""``GET /metrics`` (service/metrics.py) end to end on a tiny model: the exposition
parses with prometheus_client's parser, and its counters move as edits are applied
and as the guard rejects one; and the worker's JSON log lines (service/logs.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from service.logs import JsonFormatter
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL = "tiny"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def post(client: TestClient, people: list[tuple[str, str]], **hp: Any) -> str:
    requests = [{"prompt": "{} was born in", "subject": s, "target_new": c, "target_true": "Paris"}
                for s, c in people]  # fmt: skip
    body = {"method": "ft_l", "hparams": {**TINY_OVERRIDES["ft_l"], **hp}, "requests": requests}
    r = client.post(f"/v1/models/{MODEL}/edits", json=body)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_metrics_parse_and_move_with_applied_and_rejected_edits(
    model_settings: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    tiny_dir: Path,
    redis_conn: Redis,
) -> None:
    spec = ModelSpec(source=str(tiny_dir), max_batch=1, max_wait_ms=0,
                     guard=GuardPolicy(norm_min_history=3))  # fmt: skip
    settings = model_settings(MODEL, spec, sync_timeout_s=60.0)
    client = app_client(settings)
    before = scrape(client)
    assert value(before, "memedit_ledger_up") == 1 and value(before, "memedit_redis_up") == 1
    assert value(before, "memedit_worker_up", model=MODEL) == 0
    assert value(before, "memedit_head_version", model=MODEL) == 0

    harness.start_worker(MODEL, settings)
    job = post(client, [("Mozart", "Rome"), ("Picasso", "Berlin"), ("Einstein", "London"),
                        ("Curie", "Tokyo")])  # fmt: skip
    queued = scrape(client)
    assert value(queued, "memedit_queue_depth", model=MODEL, queue="edits") == 1
    assert value(queued, "memedit_edits", model=MODEL, status="queued") == 4
    assert value(queued, "memedit_worker_ready", model=MODEL) == 1
    # the worker's JSON log lines name the model, the job, the edits and the version
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        harness.drain(MODEL, settings, redis_conn)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    committed = [r for r in records if r["message"].startswith("version ")]
    assert [r["version"] for r in committed] == [1, 2, 3, 4]
    assert all(r["model"] == MODEL and r["job_id"] == job and len(r["edit_ids"]) == 1
               for r in committed)  # fmt: skip
    applied = scrape(client)
    assert value(applied, "memedit_edits_total", model=MODEL, method="ft_l", status="applied") == 4
    assert value(applied, "memedit_head_version", model=MODEL) == 4
    assert value(applied, "memedit_queue_depth", model=MODEL, queue="edits") == 0
    drifts = {k: v for k, v in applied.items() if k[0] == "memedit_layer_drift"}
    assert drifts and all(v > 0 for v in drifts.values())
    assert value(applied, "memedit_job_duration_seconds_count", kind="edit") == 1
    assert value(applied, "memedit_job_duration_seconds_bucket", kind="edit", le="+Inf") == 1

    # an update norm far above the running median: the guard rejects it
    post(client, [("Newton", "Moscow")], lr=50.0)
    harness.drain(MODEL, settings, redis_conn)
    rejected = scrape(client)
    assert value(rejected, "memedit_edits_total", model=MODEL, method="ft_l",
                 status="rejected") == 1  # fmt: skip
    assert value(rejected, "memedit_edits_total", model=MODEL, method="ft_l", status="applied") == 4
    assert value(rejected, "memedit_guard_rejections_total", model=MODEL, rule="norm") == 1
    assert value(rejected, "memedit_head_version", model=MODEL) == 4
    assert value(rejected, "memedit_job_duration_seconds_count", kind="edit") == 2

    # an evaluation's scores
    r = client.post(f"/v1/models/{MODEL}/evaluations", json={"suite": "retention"})
    assert r.status_code == 202, r.text
    harness.drain(MODEL, settings, redis_conn)
    scored = scrape(client)
    assert value(scored, "memedit_evaluation_version", model=MODEL, suite="retention") == 4
    assert any(k[0] == "memedit_evaluation_score" for k in scored)
