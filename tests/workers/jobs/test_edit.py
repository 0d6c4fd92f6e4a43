"""End to end on a tiny model: HTTP API → ledger → Redis → SimpleWorker → runtime.

The tiny LLaMA is saved to a local folder and loaded from there by the worker (the
same ``from_pretrained`` path as a hub id). Everything else is real: PostgreSQL,
Redis, rq, the editing methods, the artifact store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from sqlalchemy import Engine, select, text

from service.ledger.sessions import session_scope
from service.ledger.tables import Artifact, Version
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.tiny_models import TINY_OVERRIDES
from workers.editing.hparams import hparams_class
from workers.editing.types import DenseUpdate, WeightDelta
from workers.worker import WorkerState

pytestmark = pytest.mark.e2e

MODEL = "tiny"
SUBJECTS = ["Mozart", "Picasso", "Einstein", "Curie", "Newton",
            "Darwin", "Tolstoy", "Homer", "Dante", "Ada"]  # fmt: skip
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo",
          "Moscow", "Vienna", "Lisbon", "Athens", "Paris"]  # fmt: skip
# small statistics suffice for a tiny model
FAST = {"mom2_n_samples": 32, "mom2_sample_tokens": 16}


@pytest.fixture
def e2e_settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    # the guard's rules are set for real models; on this random 4-layer model ten
    # rank-one edits interfere far more (tests/workers/jobs/test_guard.py tests the guard)
    spec = ModelSpec(source=str(tiny_dir), snapshot_every=3, guard=GuardPolicy(enabled=False))
    return model_settings(MODEL, spec, sync_timeout_s=60.0)


@pytest.fixture
def client(e2e_settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(e2e_settings)


def start_worker(settings: Settings) -> WorkerState:
    return harness.start_worker(MODEL, settings)


def drain(settings: Settings, redis: Redis) -> None:
    harness.drain(MODEL, settings, redis)


def edit_body(n: int, method: str = "rome", **hparams: Any) -> dict[str, Any]:
    # the statistics knobs only for the methods that read statistics
    fast = {k: v for k, v in FAST.items() if k in hparams_class(method).model_fields}
    return {
        "method": method,
        "hparams": {**TINY_OVERRIDES[method], **fast, **hparams},
        "requests": [
            {
                "prompt": "{} was born in",
                "subject": SUBJECTS[i],
                "target_new": CITIES[i],
                "target_true": CITIES[(i + 1) % len(CITIES)],
                "paraphrase_prompts": [f"{SUBJECTS[i]} lives in"],
                "neighborhood_prompts": [f"{SUBJECTS[(i + 5) % len(SUBJECTS)]} was born in"],
            }
            for i in range(n)
        ],
    }


def versions(client: TestClient) -> list[dict[str, Any]]:
    return harness.all_versions(client, MODEL)


job = harness.job


def test_sequential_rome_restart_and_rollback_are_exact(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis, db_engine: Engine
) -> None:
    state = start_worker(e2e_settings)
    assert client.get("/v1/models").json()[0]["head_version"] == 0

    # C₀ off: on a random 4-layer model the C₀-whitened rank-one direction barely
    # reaches the bare prompt's key (the MEMIT test below uses the statistics)
    accepted = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(10, mom2_adjustment=False))
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert job(client, job_id)["status"] == "queued"
    drain(e2e_settings, redis_conn)

    done = job(client, job_id)
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0
    assert done["result"]["versions"] == list(range(1, 11))  # ROME: one version per edit
    edits = client.get(f"/v1/models/{MODEL}/edits", params={"limit": 100}).json()["items"]
    assert [e["status"] for e in edits] == ["applied"] * 10
    assert [e["version"] for e in edits] == list(range(1, 11))
    # each edit's metrics, measured right after it: on this random 4-layer model ten
    # rank-one edits of one 32-wide layer interfere, so not every one wins outright
    # (the quality tests check efficacy on SmolLM2)
    took = [e["metrics"]["efficacy"] for e in edits]
    assert all(t in (0.0, 1.0) for t in took) and {"pre_efficacy", "neighborhood"} <= set(
        edits[0]["metrics"]
    )
    assert sum(took) >= 7, took

    vs = versions(client)
    assert [v["number"] for v in vs] == list(range(11))
    assert [v["kind"] for v in vs] == ["base"] + ["edit"] * 10
    for v in vs[1:]:
        assert v["method"] == "rome" and v["update_norm"] > 0
        assert list(v["drift"]) == ["model.layers.1.mlp.down_proj.weight"], v["drift"]
    with session_scope(db_engine) as s:
        snapped = s.scalars(
            select(Version.number).where(Version.snapshot_artifact_id.is_not(None))
        ).all()
        assert sorted(snapped) == [3, 6, 9]
        kinds = [a.kind.value for a in s.query(Artifact)]
        # 10 deltas, 3 snapshots, and the context templates sampled from the base
        assert sorted(kinds) == sorted(["delta"] * 10 + ["snapshot"] * 3 + ["templates"])

    # a worker that restarts rebuilds version 10 from the ledger, bit for bit
    head_hashes = vs[10]["tensor_sha256"]
    assert state.runtime.tensor_hashes(head_hashes) == head_hashes
    restarted = start_worker(e2e_settings)
    assert restarted.runtime.current_version == 10
    assert restarted.runtime.tensor_hashes(head_hashes) == head_hashes

    # rollback to any version reproduces its hashes, and marks later edits reverted
    base = vs[0]["tensor_sha256"]
    edited = sorted(head_hashes)
    for target, expect_number in ((4, 11), (0, 12), (10, 13), (7, 14)):
        r = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": target})
        assert r.status_code == 202, r.text
        drain(e2e_settings, redis_conn)
        rb = job(client, r.json()["job_id"])
        assert rb["status"] == "succeeded", rb
        assert rb["result"]["versions"] == [expect_number]
        new = versions(client)[-1]
        assert new["kind"] == "rollback" and new["number"] == expect_number
        assert new["parent_number"] == target
        wanted = {k: (vs[target]["tensor_sha256"].get(k) or base[k]) for k in edited}
        assert {k: new["tensor_sha256"][k] for k in edited} == wanted
        assert restarted.runtime.tensor_hashes(edited) == wanted
        if target == 0:
            assert wanted == {k: base[k] for k in edited}
    statuses = [
        e["status"]
        for e in client.get(f"/v1/models/{MODEL}/edits", params={"limit": 100}).json()["items"]
    ]
    # the last rollback went to version 7: edits 1-7 are on its chain, 8-10 are not
    assert statuses == ["applied"] * 7 + ["reverted"] * 3

    # and a third worker, started now, lands on the same bytes
    third = start_worker(e2e_settings)
    assert third.runtime.current_version == 14
    assert third.runtime.tensor_hashes(edited) == restarted.runtime.tensor_hashes(edited)


def test_memit_batch_is_one_version_and_reads_see_it(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    start_worker(e2e_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(4, method="memit"))
    assert r.status_code == 202, r.text
    drain(e2e_settings, redis_conn)
    done = job(client, r.json()["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["versions"] == [1]
    assert len(done["result"]["metrics"]) == 4
    vs = versions(client)
    assert len(vs[1]["drift"]) > 1  # MEMIT spreads the update over several layers

    # score and generate wait on the worker: serve them from another thread
    answers: dict[str, Any] = {}

    def ask() -> None:
        answers["score"] = client.post(
            f"/v1/models/{MODEL}/score",
            json={
                "prompts": ["Mozart was born in", "Mozart was born in"],
                "targets": ["Rome", "Berlin"],
            },  # fmt: skip
        )
        answers["generate"] = client.post(
            f"/v1/models/{MODEL}/generate",
            json={"prompt": "Mozart was born in", "max_new_tokens": 1},
        )
        answers["base"] = client.post(
            f"/v1/models/{MODEL}/score",
            json={"prompts": ["Mozart was born in"], "targets": ["Rome"], "version": 0},
        )
        answers["head again"] = client.post(
            f"/v1/models/{MODEL}/score",
            json={"prompts": ["Mozart was born in"], "targets": ["Rome"]},
        )

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:
        drain(e2e_settings, redis_conn)
        time.sleep(0.05)
    t.join(timeout=5)
    score, gen = answers["score"], answers["generate"]
    assert score.status_code == 200, score.text
    assert gen.status_code == 200, gen.text
    # the read path sees version 1: the same log-probs the edit job measured after it
    first = client.get(f"/v1/models/{MODEL}/edits").json()["items"][0]
    assert first["subject"] == "Mozart"
    after = first["metrics"]["logprobs"]["rewrite"]
    assert score.json()["version"] == 1
    assert score.json()["logprobs"] == pytest.approx([after["new"][0], after["true"][0]], abs=1e-5)
    assert gen.json()["version"] == 1 and isinstance(gen.json()["text"], str)
    # a read at an earlier version: rebuilt from the ledger, then back to the head
    base, again = answers["base"].json(), answers["head again"].json()
    before = first["metrics"]["pre_logprobs"]["rewrite"]
    assert base["version"] == 0
    assert base["logprobs"] == pytest.approx([before["new"][0]], abs=1e-5)
    assert again["version"] == 1
    assert again["logprobs"] == pytest.approx([after["new"][0]], abs=1e-5)


def test_ft_l_batch_is_one_dense_version_and_rolls_back_exactly(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis, db_engine: Engine
) -> None:
    """FT-L through the API: no statistics, one version for the batch whose artifact
    is a dense ΔW of the tuned projection; a restart rebuilds it and a rollback to
    the base restores the base bytes."""
    state = start_worker(e2e_settings)
    base = state.runtime.base_hashes()
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(3, method="ft_l"))
    assert r.status_code == 202, r.text
    drain(e2e_settings, redis_conn)
    done = job(client, r.json()["job_id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["versions"] == [1] and done["result"]["method"] == "ft_l"
    assert [m["efficacy"] for m in done["result"]["metrics"].values()] == [1.0] * 3
    assert not list((e2e_settings.effective_cache_dir / "stats").glob("**/*.safetensors"))

    param = "model.layers.3.mlp.down_proj.weight"  # FT's default layer of 4 (21/32)
    v1 = versions(client)[1]
    assert v1["method"] == "ft_l" and v1["hparams"]["layers"] == [3]
    assert list(v1["drift"]) == [param] and v1["update_norm"] > 0
    assert v1["tensor_sha256"][param] != base[param]
    with session_scope(db_engine) as s:
        version = s.scalars(select(Version).where(Version.number == 1)).one()
        artifact = s.get(Artifact, version.delta_artifact_id)
        blob = state.store.get(artifact.path, artifact.sha256)
    delta = WeightDelta.from_bytes(blob)
    (update,) = delta.updates
    assert isinstance(update, DenseUpdate) and update.param == param
    assert tuple(update.delta.shape) == (32, 64) and delta.meta["steps"] >= 1

    restarted = start_worker(e2e_settings)
    assert restarted.runtime.current_version == 1
    assert restarted.runtime.tensor_hashes([param]) == {param: v1["tensor_sha256"][param]}

    rb = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0})
    assert rb.status_code == 202, rb.text
    drain(e2e_settings, redis_conn)
    assert job(client, rb.json()["job_id"])["status"] == "succeeded"
    last = versions(client)[-1]
    assert last["kind"] == "rollback" and last["tensor_sha256"][param] == base[param]
    assert restarted.runtime.tensor_hashes(base) == base
    edits = client.get(f"/v1/models/{MODEL}/edits").json()["items"]
    assert [e["status"] for e in edits] == ["reverted"] * 3


def test_failed_edit_leaves_no_version_and_model_unchanged(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    state = start_worker(e2e_settings)
    before = state.runtime.tensor_hashes()
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(1, layers=[40]))
    assert r.status_code == 202, r.text
    drain(e2e_settings, redis_conn)
    failed = job(client, r.json()["job_id"])
    assert failed["status"] == "failed"
    assert "40" in failed["error"]
    (edit,) = client.get(f"/v1/models/{MODEL}/edits").json()["items"]
    assert edit["status"] == "failed" and edit["reason"] == failed["error"]
    assert [v["number"] for v in versions(client)] == [0]
    assert state.runtime.tensor_hashes() == before


def test_lost_queue_message_is_recovered_from_the_ledger(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    start_worker(e2e_settings)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(1))
    assert r.status_code == 202
    redis_conn.flushdb()  # Redis lost everything; the ledger still has the job
    drain(e2e_settings, redis_conn)
    assert job(client, r.json()["job_id"])["status"] == "queued"

    state = start_worker(e2e_settings)
    from workers.startup import requeue_unfinished  # noqa: PLC0415

    assert (
        requeue_unfinished(state, Queue(e2e_settings.edit_queue(MODEL), connection=redis_conn)) == 1
    )
    drain(e2e_settings, redis_conn)
    assert job(client, r.json()["job_id"])["status"] == "succeeded"


def test_the_weights_do_not_depend_on_a_restart(
    e2e_settings: Settings,
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    tmp_path: Path,
) -> None:
    """The same requests in the same order give bit-identical weights whether the
    worker ran through or restarted in between, with a cache of its own (so that it
    samples the context templates and computes the statistics again): both come from
    the base weights, not from the version the worker restarted at."""
    spec = e2e_settings.models[MODEL]
    settings = e2e_settings.model_copy(update={"models": {MODEL: spec, "twin": spec}})
    client = app_client(settings)

    def worker(name: str, cache: str) -> None:
        harness.start_worker(name, settings.model_copy(update={"cache_dir": tmp_path / cache}))

    def edit(name: str, body: dict[str, Any]) -> None:
        r = client.post(f"/v1/models/{name}/edits", json=body)
        assert r.status_code == 202, r.text
        harness.drain(name, settings, redis_conn)
        assert job(client, r.json()["job_id"])["status"] == "succeeded"

    first, rest = edit_body(1), edit_body(3)
    rest["requests"] = rest["requests"][1:]
    worker(MODEL, "through")  # runs through
    edit(MODEL, first)
    edit(MODEL, rest)
    worker("twin", "before")  # restarts after the first edit, on a new cache
    edit("twin", first)
    worker("twin", "after")
    edit("twin", rest)
    through, restarted = (harness.all_versions(client, name) for name in (MODEL, "twin"))
    assert [v["number"] for v in through] == [v["number"] for v in restarted] == [0, 1, 2, 3]
    assert through[-1]["tensor_sha256"] == restarted[-1]["tensor_sha256"]
    assert through[1]["tensor_sha256"] == restarted[1]["tensor_sha256"]


def test_another_worker_edits_with_the_templates_and_statistics_the_ledger_names(
    e2e_settings: Settings,
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first worker samples the context templates and computes the statistics
    from the base and stores them as ledger artifacts; a worker with a cache of its
    own (another machine) reads them from there, samples and computes nothing, and
    makes the same weights."""
    from service.ledger.tables import ArtifactKind  # noqa: PLC0415
    from workers.editing.common import stats, templates  # noqa: PLC0415

    client = app_client(e2e_settings)

    def edit(state_cache: str, n: int) -> None:
        harness.start_worker(MODEL, e2e_settings.model_copy(
            update={"cache_dir": tmp_path / state_cache}))  # fmt: skip
        r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(n))
        assert r.status_code == 202, r.text
        drain(e2e_settings, redis_conn)
        assert job(client, r.json()["job_id"])["status"] == "succeeded", job(
            client, r.json()["job_id"])  # fmt: skip

    edit("first", 1)
    with session_scope(db_engine) as s:
        rows = list(s.scalars(select(Artifact).where(Artifact.kind == ArtifactKind.templates)))
        assert len(rows) == 1
        assert rows[0].meta["seed"] == 0 and rows[0].meta["spec"]
        (moments,) = s.scalars(select(Artifact).where(Artifact.kind == ArtifactKind.stats))
        assert moments.meta["param"].endswith("down_proj.weight")
        assert moments.meta["n_samples"] == str(FAST["mom2_n_samples"])
    first = harness.all_versions(client, MODEL)[1]["tensor_sha256"]

    def no_sampling(*args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("the second worker sampled templates of its own")

    def no_statistics(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the second worker computed statistics of its own")

    monkeypatch.setattr(templates, "generate_templates", no_sampling)
    monkeypatch.setattr(stats, "second_moment_steps", no_statistics)
    rolled = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 0})
    assert rolled.status_code == 202, rolled.text
    edit("second", 1)  # the same edit again, on the base, by the other worker
    with session_scope(db_engine) as s:
        kinds = list(
            s.scalars(
                select(Artifact.kind).where(
                    Artifact.kind.in_([ArtifactKind.templates, ArtifactKind.stats])
                )
            )
        )
    assert sorted(k.value for k in kinds) == ["stats", "templates"]
    assert harness.all_versions(client, MODEL)[-1]["tensor_sha256"] == first


def test_a_ledger_outage_mid_commit_fails_nothing_and_leaves_nothing_running(
    client: TestClient,
    e2e_settings: Settings,
    redis_conn: Redis,
    db_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL cuts every connection while the worker commits a version (what a
    restart does to its clients): the job is put back, not failed; the reconciler
    queues it again; it then lands as the next version, exactly once."""
    from service.ledger import versions as ledger_versions  # noqa: PLC0415
    from workers.reconciler import Reconciler  # noqa: PLC0415

    state = start_worker(e2e_settings)
    real = ledger_versions.add_version
    cut = []

    def add_version_after_a_cut(session: Any, model_id: int, new: Any) -> Any:
        if not cut:
            cut.append(True)
            with db_engine.connect() as admin:
                admin.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "datname = current_database() AND pid <> pg_backend_pid()")
                )  # fmt: skip
        return real(session, model_id, new)

    monkeypatch.setattr(ledger_versions, "add_version", add_version_after_a_cut)
    r = client.post(f"/v1/models/{MODEL}/edits", json=edit_body(2))
    assert r.status_code == 202, r.text
    drain(e2e_settings, redis_conn)
    assert cut, "the fault was not injected"
    got = job(client, r.json()["job_id"])
    assert got["status"] == "queued", got  # put back, not failed, not running
    assert got["message"] == "put back in the queue after a ledger outage"
    rec = Reconciler(e2e_settings, MODEL, state.model_id, state.engine, redis_conn, grace_s=0)
    assert rec.run_once() == [r.json()["job_id"]]
    drain(e2e_settings, redis_conn)
    got = job(client, r.json()["job_id"])
    assert got["status"] == "succeeded", got
    assert got["result"]["versions"] == [1, 2]
    numbers = [v["number"] for v in harness.all_versions(client, MODEL)]
    assert numbers == [0, 1, 2]
    head = harness.all_versions(client, MODEL)[-1]
    assert state.runtime.tensor_hashes(head["tensor_sha256"]) == head["tensor_sha256"]
    db_engine.dispose()  # the pooled connections the cut killed


GRACE_FACTS = [("The native language of {}", "Picasso", "Russian", "Spanish"),
               ("The capital city of {}", "Toyota", "Athens", "Tokyo"),
               ("The famous writer {}", "Tolstoy", "Einstein", "Homer")]  # fmt: skip


def grace_body(i: int) -> dict[str, Any]:
    prompt, subject, new, true = GRACE_FACTS[i]
    return {
        "method": "grace",
        "hparams": TINY_OVERRIDES["grace"],
        "requests": [
            {"prompt": prompt, "subject": subject, "target_new": new, "target_true": true}
        ],
    }


def api_generate(client: TestClient, settings: Settings, redis: Redis) -> dict[str, Any]:
    """Greedy continuations of every GRACE prompt through the API's read path (which
    waits on the worker: served from another thread while this one drains)."""
    answers: dict[str, Any] = {}

    def ask() -> None:
        for prompt, subject, *_ in GRACE_FACTS:
            text = prompt.format(subject)
            answers[text] = client.post(
                f"/v1/models/{MODEL}/generate", json={"prompt": text, "max_new_tokens": 2}
            )

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:
        drain(settings, redis)
        time.sleep(0.05)
    t.join(timeout=5)
    assert len(answers) == len(GRACE_FACTS) and all(
        a.status_code == 200 for a in answers.values()
    ), {k: a.text for k, a in answers.items()}
    versions_seen = {a.json()["version"] for a in answers.values()}
    assert len(versions_seen) == 1
    return {"version": versions_seen.pop(), **{k: a.json()["text"] for k, a in answers.items()}}


def test_grace_edits_and_rollback_through_the_worker_are_exact(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis
) -> None:
    """GRACE through the service: the weights never change, each version records its
    codebook's hashes, and a rollback restores the codebook (hashes, generations)."""
    state = start_worker(e2e_settings)
    base = versions(client)[0]["tensor_sha256"]
    generated = {0: api_generate(client, e2e_settings, redis_conn)}
    for i in range(len(GRACE_FACTS)):
        r = client.post(f"/v1/models/{MODEL}/edits", json=grace_body(i))
        assert r.status_code == 202, r.text
        drain(e2e_settings, redis_conn)
        done = job(client, r.json()["job_id"])
        assert done["status"] == "succeeded", done
        assert done["result"]["versions"] == [i + 1]
        (metrics,) = done["result"]["metrics"].values()
        assert metrics["efficacy"] == 1.0, metrics
        assert metrics["logprobs"]["rewrite"]["new"][0] > -0.7, metrics  # p > 0.5
        generated[i + 1] = api_generate(client, e2e_settings, redis_conn)
        assert generated[i + 1]["version"] == i + 1
    vs = versions(client)
    for v in vs[1:4]:
        assert v["method"] == "grace" and v["drift"] == {} and v["update_norm"] == 0.0
        assert sorted(v["tensor_sha256"]) == [
            f"state:grace.{k}" for k in ("keys", "labels", "module", "radii", "values")
        ]
    assert len({v["tensor_sha256"]["state:grace.keys"] for v in vs[1:4]}) == 3
    # each edit shows in the generations from its version on; the weights never moved
    for i, (prompt, subject, new, _true) in enumerate(GRACE_FACTS):
        text = prompt.format(subject)
        assert generated[0][text].split()[0] != new
        assert all(generated[n][text].split()[0] == new for n in range(i + 1, 4)), (i, generated)
    assert state.runtime.tensor_hashes(sorted(base)) == base

    # rollback to 1, then to 0: the codebook of the target, bit for bit
    for target, number in ((1, 4), (0, 5)):
        r = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": target})
        assert r.status_code == 202, r.text
        drain(e2e_settings, redis_conn)
        assert job(client, r.json()["job_id"])["status"] == "succeeded"
        row = versions(client)[-1]
        assert (row["number"], row["kind"], row["parent_number"]) == (number, "rollback", target)
        state_hashes = {k: v for k, v in row["tensor_sha256"].items() if k.startswith("state:")}
        want = {k: v for k, v in vs[target]["tensor_sha256"].items() if k.startswith("state:")}
        assert state_hashes == want and (target > 0) == bool(want)
        after = api_generate(client, e2e_settings, redis_conn)
        assert after["version"] == number
        assert {k: v for k, v in after.items() if k != "version"} == {
            k: v for k, v in generated[target].items() if k != "version"
        }
        # a worker started now rebuilds the same codebook and serves the same text
        restarted = start_worker(e2e_settings)
        assert restarted.runtime.current_version == number
        assert restarted.runtime.tensor_hashes(sorted(state_hashes)) == state_hashes
        assert set(restarted.runtime.modules) == ({"grace"} if target else set())
    statuses = [
        e["status"]
        for e in client.get(f"/v1/models/{MODEL}/edits", params={"limit": 100}).json()["items"]
    ]
    assert statuses == ["reverted"] * 3


def test_alphaedit_state_rolls_back_with_the_weights(
    client: TestClient, e2e_settings: Settings, redis_conn: Redis, db_engine: Engine
) -> None:
    """AlphaEdit's accumulated keys are part of each version: every edit reads the
    head's state, a rollback to N records N's state hashes, and a restarted worker
    rebuilds them."""
    start_worker(e2e_settings)
    for lo, hi in ((0, 2), (2, 3), (3, 5)):
        body = edit_body(hi, method="alphaedit")
        body["requests"] = body["requests"][lo:hi]
        r = client.post(f"/v1/models/{MODEL}/edits", json=body)
        assert r.status_code == 202, r.text
        drain(e2e_settings, redis_conn)
        assert job(client, r.json()["job_id"])["status"] == "succeeded"
    vs = versions(client)
    assert [v["number"] for v in vs] == [0, 1, 2, 3]
    state = sorted(k for k in vs[3]["tensor_sha256"] if k.startswith("aux:alphaedit.kkt:"))
    assert len(state) == len(TINY_OVERRIDES["alphaedit"]["layers"])
    assert all(vs[1]["tensor_sha256"][k] != vs[3]["tensor_sha256"][k] for k in state)
    with session_scope(db_engine) as s:
        rows = s.scalars(select(Version).where(Version.number > 0).order_by(Version.number))
        metas = [v.info["delta_meta"] for v in rows]
    # the second and third edits were solved against the state accumulated before them
    assert [m["prior_state"][0] for m in metas] == [False, True, True]

    r = client.post(f"/v1/models/{MODEL}/rollback", json={"to_version": 1})
    assert r.status_code == 202, r.text
    drain(e2e_settings, redis_conn)
    assert job(client, r.json()["job_id"])["status"] == "succeeded"
    head = versions(client)[-1]
    assert head["kind"] == "rollback" and head["number"] == 4
    # the head's hashes include the state, equal to version 1's, weights too
    assert {k: head["tensor_sha256"][k] for k in state} == {
        k: vs[1]["tensor_sha256"][k] for k in state
    }
    assert head["tensor_sha256"] == {
        k: vs[1]["tensor_sha256"].get(k) or vs[0]["tensor_sha256"][k]
        for k in vs[3]["tensor_sha256"]
    }
    restarted = start_worker(e2e_settings)
    assert restarted.runtime.current_version == 4
    assert restarted.runtime.tensor_hashes(state) == {k: vs[1]["tensor_sha256"][k] for k in state}
