"""The guard end to end on a tiny model: HTTP API → ledger → Redis → SimpleWorker.

A disabling update is rejected before it is committed (no version, the runtime's
tensors unchanged, the edit ``rejected`` with the reason and the numbers, the
decision in ``guard_decisions``) and the next ordinary edit applies; a batch of
several jobs that the guard rejects is retried job by job, so that only the
offending request is rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine, select

from service.ledger.sessions import session_scope
from service.ledger.tables import GuardDecision, Version
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES

pytestmark = pytest.mark.e2e

MODEL = "tiny"


@pytest.fixture
def configured(model_settings: Callable[..., Settings], tiny_dir: Path) -> Callable[..., Settings]:
    """``configured(max_batch, **guard)``: the tiny model under that guard policy."""

    def make(max_batch: int, **guard: Any) -> Settings:
        spec = ModelSpec(
            source=str(tiny_dir), max_batch=max_batch, max_wait_ms=0, guard=GuardPolicy(**guard)
        )
        return model_settings(MODEL, spec, sync_timeout_s=60.0)

    return make


def request(subject: str, new: str, true: str) -> dict[str, Any]:
    return {
        "prompt": "{} was born in",
        "subject": subject,
        "target_new": new,
        "target_true": true,
        "paraphrase_prompts": [f"{subject} lives in"],
    }


def post(client: TestClient, method: str, requests: list[dict[str, Any]], **hp: Any) -> str:
    body = {"method": method, "hparams": {**TINY_OVERRIDES[method], **hp}}
    r = client.post(f"/v1/models/{MODEL}/edits", json={**body, "requests": requests})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def edits(client: TestClient) -> list[dict[str, Any]]:
    return client.get(f"/v1/models/{MODEL}/edits", params={"limit": 100}).json()["items"]


def decisions(engine: Engine) -> list[GuardDecision]:
    with session_scope(engine) as s:
        rows = s.scalars(select(GuardDecision).order_by(GuardDecision.id)).all()
        s.expunge_all()
        return list(rows)


def test_disabling_update_is_rejected_and_nothing_is_committed(
    configured: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
    measurements: list[str],
) -> None:
    # the norm rule after three accepted FT-L updates (the default waits for ten)
    cfg = configured(max_batch=1, norm_min_history=3)
    client = app_client(cfg)
    state = harness.start_worker(MODEL, cfg)
    people = [("Mozart", "Rome"), ("Picasso", "Berlin"), ("Einstein", "London"), ("Curie", "Tokyo")]
    ordinary = post(client, "ft_l", [request(s, c, "Paris") for s, c in people])
    harness.drain(MODEL, cfg, redis_conn)
    assert harness.job(client, ordinary)["result"]["versions"] == [1, 2, 3, 4]
    accepted = decisions(db_engine)
    assert [d.accepted for d in accepted] == [True] * 4
    with session_scope(db_engine) as s:
        version_ids = s.scalars(select(Version.id).where(Version.number > 0)).all()
    assert sorted(d.version_id for d in accepted) == sorted(version_ids)
    assert [d.parent_number for d in accepted] == [0, 1, 2, 3]
    assert accepted[3].norm_median is not None and accepted[3].norm_ratio < 10
    assert accepted[0].measurements["norm_rule"].startswith("skipped: 0 accepted")
    assert all(d.perplexity_before > 0 and d.perplexity_after > 0 for d in accepted)
    versions = harness.all_versions(client, MODEL)
    assert all("guard_s" in v["timing"] for v in versions[1:])

    # a learning rate 1000× the usual: an update norm far above the running median
    everything = sorted(state.runtime.base_hashes())
    hashes = state.runtime.tensor_hashes(everything)
    head = versions[-1]
    bad = post(client, "ft_l", [request("Newton", "Moscow", "London")], lr=50.0)
    harness.drain(MODEL, cfg, redis_conn)
    done = harness.job(client, bad)
    assert done["status"] == "succeeded" and done["error"] is None, done
    assert done["result"]["versions"] == []
    (rejection,) = done["result"]["rejected"]
    # the norm rule rejects it (the canary may too: such an update hurts perplexity)
    assert "norm" in rejection["rules"] and rejection["reason"].startswith("rejected by the guard")
    newton = edits(client)[-1]
    assert newton["status"] == "rejected" and newton["version"] is None
    assert newton["reason"] == rejection["reason"] and "running median" in newton["reason"]
    guard = newton["metrics"]["guard"]
    assert guard["norm_ratio"] > 100 and guard["decision_id"] == rejection["guard_decision_id"]
    assert {"efficacy", "pre_efficacy", "neighborhood"} <= set(newton["metrics"])
    # nothing committed: same versions, same head, the runtime's tensors bit for bit
    assert harness.all_versions(client, MODEL) == versions
    assert state.runtime.current_version == head["number"] == 4
    assert state.runtime.tensor_hashes(everything) == hashes
    assert state.runtime.tensor_hashes(head["tensor_sha256"]) == head["tensor_sha256"]
    last = decisions(db_engine)[-1]
    assert not last.accepted and last.version_id is None and last.rules == rejection["rules"]
    assert last.parent_number == 4 and last.edit_ids == [newton["id"]]
    assert last.update_norm > 100 * last.norm_median and last.seconds > 0

    # the next ordinary edit applies on top of version 4
    after = post(client, "ft_l", [request("Darwin", "Vienna", "London")])
    harness.drain(MODEL, cfg, redis_conn)
    assert harness.job(client, after)["result"]["versions"] == [5]
    assert edits(client)[-1]["status"] == "applied"
    final = decisions(db_engine)
    assert [d.accepted for d in final] == [True] * 4 + [False, True]
    assert final[-1].parent_number == 4 and final[-1].norm_ratio < 10
    # the same decisions over the API, the rejected one alone with accepted=false
    listed = client.get(f"/v1/models/{MODEL}/guard-decisions", params={"limit": 4}).json()
    assert [d["accepted"] for d in listed["items"]] == [True] * 4
    assert [d["version"] for d in listed["items"]] == [1, 2, 3, 4]
    rest = client.get(
        f"/v1/models/{MODEL}/guard-decisions", params={"cursor": listed["next_cursor"]}
    ).json()
    assert [d["version"] for d in rest["items"]] == [None, 5] and rest["next_cursor"] is None
    (refused,) = client.get(
        f"/v1/models/{MODEL}/guard-decisions", params={"accepted": "false"}
    ).json()["items"]
    assert refused["id"] == rejection["guard_decision_id"] and refused["parent_version"] == 4
    assert refused["rules"] == rejection["rules"] and refused["edit_ids"] == [newton["id"]]
    assert refused["update_norm"] == last.update_norm and refused["measurements"]
    bad_cursor = client.get(
        f"/v1/models/{MODEL}/guard-decisions", params={"cursor": listed["next_cursor"] + "x"}
    )
    assert bad_cursor.status_code == 422
    guard_s = [v["timing"]["guard_s"] for v in harness.all_versions(client, MODEL)[1:]]
    measurements.append(
        f"guard on the tiny LLaMA (FT-L): {sum(guard_s) / len(guard_s):.4f} s per edit "
        f"(max {max(guard_s):.4f} s) of total {versions[-1]['timing']['total_s']:.3f} s"
    )


def test_a_rejected_batch_is_retried_per_job_and_only_the_offender_is_rejected(
    configured: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
) -> None:
    """Words outside the tiny vocabulary are all ``<unk>``: six edits about unknown
    subjects share one prompt and teach FT-L "Rome". A later request about another
    unknown subject with target "Paris" overwrites all six (the recall rule rejects
    it); two ordinary requests batched with it are applied. The canary texts are
    mostly ``<unk>`` in the tiny vocabulary, so editing that key moves their
    perplexity too: this test sets the perplexity rule aside to isolate the recall
    rule."""
    cfg = configured(max_batch=4, perplexity_ratio=1000.0)
    client = app_client(cfg)
    harness.start_worker(MODEL, cfg)
    unknown = ["Xavier", "Yolanda", "Zora", "Walter", "Victor", "Ursula"]
    first = post(client, "ft_l", [request(s, "Rome", "Paris") for s in unknown])
    harness.drain(MODEL, cfg, redis_conn)
    assert harness.job(client, first)["result"]["versions"] == [1, 2]  # 4 + 2 requests
    assert [e["metrics"]["efficacy"] for e in edits(client)] == [1.0] * 6

    jobs = [
        post(client, "ft_l", [request("Mozart", "Tokyo", "Vienna")]),
        post(client, "ft_l", [request("Quentin", "Paris", "Rome")]),  # the offender
        post(client, "ft_l", [request("Picasso", "Berlin", "Madrid")]),
    ]
    harness.drain(MODEL, cfg, redis_conn)
    done = [harness.job(client, j) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert done[0]["result"]["versions"] == [3] and done[2]["result"]["versions"] == [4]
    assert done[1]["result"]["versions"] == [] and done[1]["result"]["rejected"][0]["rules"] == [
        "recall"
    ]
    by_subject = {e["subject"]: e for e in edits(client)}
    assert by_subject["Quentin"]["status"] == "rejected"
    assert "earlier edits" in by_subject["Quentin"]["reason"]
    assert by_subject["Mozart"]["status"] == by_subject["Picasso"]["status"] == "applied"
    assert all(by_subject[s]["status"] == "applied" for s in unknown)

    rows = decisions(db_engine)
    # versions 1, 2; the batch of three (rejected, retried); Mozart, Quentin, Picasso
    assert [(d.accepted, len(d.edit_ids)) for d in rows] == [
        (True, 4), (True, 2), (False, 3), (True, 1), (False, 1), (True, 1)
    ]  # fmt: skip
    batch = rows[2]
    assert batch.measurements["retried_per_job"] is True and batch.rules == ["recall"]
    assert batch.recall_before == 1.0 and batch.recall_after == 0.0
    assert rows[4].measurements["retried_per_job"] is False
    # alone, after Mozart's edit: it loses the six, not Mozart's
    six = sorted(by_subject[s]["id"] for s in unknown)
    assert rows[4].measurements["recall_lost"] == six
    assert rows[4].measurements["recall_lost_fraction"] == pytest.approx(6 / 7)
    assert len(harness.all_versions(client, MODEL)) == 5
