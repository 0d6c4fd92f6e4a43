"""Sequential-batched editing end to end on tiny models: HTTP API → ledger → Redis →
SimpleWorker → runtime, all real (PostgreSQL, Redis, rq, MEMIT, the artifact store).

Jobs are posted first and the worker drains the queue afterwards, so the first job
it takes finds the others queued in the ledger and claims them (the stream test at
the end runs clients and worker at the same time).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from sqlalchemy import Engine, select

from service.ledger.sessions import session_scope
from service.ledger.tables import Edit, Job, JobStatus, Version
from service.settings import GuardPolicy, ModelSpec, Settings
from tests import worker_harness as harness
from tests.served import serve
from tests.tiny_models import TINY_OVERRIDES, save_tiny
from workers.batching import subject_key
from workers.jobs import edit as edit_job
from workers.startup import requeue_unfinished

pytestmark = pytest.mark.e2e

MODEL = "tiny"
NAMES = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin", "Tolstoy", "Homer",
         "Dante", "Ada", "Alan", "John", "Mary", "Marie", "Peter", "Anna"]  # fmt: skip
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo", "Moscow", "Vienna", "Lisbon",
          "Athens", "Paris"]  # fmt: skip
# small statistics and a short v* optimisation: these tests are about batching
FAST = {**TINY_OVERRIDES["memit"], "mom2_n_samples": 32, "mom2_sample_tokens": 16,
        "v_num_grad_steps": 5}  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer statistics, keyed by the base weights: shared by the module's tests."""
    return tmp_path_factory.mktemp("cache")


# The guard's rules are set for real models; on a random 4-layer model edits interfere
# far more (a rejected batch would change what these tests count). jobs/test_guard.py
# tests the guard.
NO_GUARD = GuardPolicy(enabled=False)


@pytest.fixture
def configure(
    model_settings: Callable[..., Settings], tiny_dir: Path, cache_dir: Path
) -> Callable[..., Settings]:
    """Settings with the tiny model under a given batching policy."""

    def make(max_batch: int = 4, max_wait_ms: int = 0, source: Path | None = None) -> Settings:
        spec = ModelSpec(
            source=str(source or tiny_dir),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            guard=NO_GUARD,
        )
        return model_settings(MODEL, spec, cache_dir=cache_dir)

    return make


def request(subject: str, city: int = 0, prompt: str = "{} was born in") -> dict[str, Any]:
    return {
        "prompt": prompt,
        "subject": subject,
        "target_new": CITIES[city % len(CITIES)],
        "target_true": CITIES[(city + 1) % len(CITIES)],
    }


def post(
    client: TestClient, *requests: dict[str, Any], hparams: dict[str, Any] | None = None, **kw: Any
) -> str:
    body = {"method": "memit", "hparams": {**FAST, **(hparams or {})}, "requests": list(requests)}
    r = client.post(f"/v1/models/{MODEL}/edits", json={**body, **kw})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def drain(settings: Settings, redis: Redis) -> None:
    harness.drain(MODEL, settings, redis)


def edits(client: TestClient) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/models/{MODEL}/edits", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def version_of_jobs(client: TestClient, job_ids: list[str]) -> list[list[int]]:
    return [harness.job(client, j)["result"]["versions"] for j in job_ids]


def batches(client: TestClient) -> dict[int, list[str]]:
    """Version number → the subjects of the edits it applied, in edit order."""
    out: dict[int, list[str]] = {}
    for e in edits(client):
        if e["version"] is not None:
            out.setdefault(e["version"], []).append(e["subject"])
    return dict(sorted(out.items()))


# -- batching rules -------------------------------------------------------------------


def test_queued_single_edits_are_applied_as_batches_of_max_batch(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
) -> None:
    settings = configure(max_batch=4)
    client = app_client(settings)
    state = harness.start_worker(MODEL, settings)
    jobs = [post(client, request(NAMES[i], i)) for i in range(10)]
    drain(settings, redis_conn)

    assert batches(client) == {1: NAMES[0:4], 2: NAMES[4:8], 3: NAMES[8:10]}
    for i, job_id in enumerate(jobs):
        job = harness.job(client, job_id)
        assert job["status"] == "succeeded" and job["progress"] == 1.0, job
        version = 1 + i // 4
        size = 4 if version < 3 else 2
        (edit_id,) = [int(k) for k in job["result"]["metrics"]]
        assert job["result"]["versions"] == [version]
        assert job["result"]["batches"] == [
            {"version": version, "size": size, "edit_ids": [edit_id]}
        ]
    with session_scope(db_engine) as s:
        info = {v.number: v.info["batch"] for v in s.scalars(select(Version)) if v.number}
        v1 = s.scalars(select(Version).where(Version.number == 1)).one()
        assert v1.job_id == jobs[0]  # the version's job: the one of its first edit
    assert info[1]["job_ids"] == jobs[0:4] and info[3]["job_ids"] == jobs[8:10]
    assert [info[n]["size"] for n in (1, 2, 3)] == [4, 4, 2]
    # the claimed jobs' rq entries ran as no-ops: nothing was applied twice
    assert Queue(settings.edit_queue(MODEL), connection=redis_conn).count == 0
    assert [v["number"] for v in harness.all_versions(client, MODEL)] == [0, 1, 2, 3]
    assert state.runtime.current_version == 3
    # a multi-request job is cut by the policy too (here together with a single edit)
    big = post(client, *[request(n, i) for i, n in enumerate(NAMES[:6])])
    single = post(client, request("Eiffel Tower", 3))
    drain(settings, redis_conn)
    assert version_of_jobs(client, [big, single]) == [[4, 5], [5]]
    assert [len(b) for b in batches(client).values()][3:] == [4, 3]


def test_same_subject_requests_never_share_a_version(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
) -> None:
    settings = configure(max_batch=4)
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    jobs = [
        post(client, request("The Eiffel Tower", 0, "{} is located in")),
        post(client, request("the  Eiffel tower", 1, "{} is located in")),  # the same subject
        post(client, request("Mozart", 2)),
        post(client, request("The Eiffel Tower", 3, "{} is located in")),
        post(client, request("Curie", 4)),
    ]
    drain(settings, redis_conn)
    assert batches(client) == {
        1: ["The Eiffel Tower", "Mozart", "Curie"],
        2: ["the  Eiffel tower"],
        3: ["The Eiffel Tower"],
    }
    # in the order they were sent: the last request about the tower is applied last
    assert version_of_jobs(client, jobs) == [[1], [2], [1], [3], [1]]
    # one job holding two facts about one subject is split the same way
    both = post(client, request("Newton", 5), request("newton", 6, "{} lives in"))
    drain(settings, redis_conn)
    assert version_of_jobs(client, [both]) == [[4, 5]]


def test_alone_is_applied_by_itself_and_no_job_overtakes_it(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
) -> None:
    settings = configure(max_batch=8)
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    alone = post(client, request("Mozart", 0), request("Curie", 1), batching="alone")
    a = post(client, request("Newton", 2))
    b = post(client, request("Darwin", 3))
    drain(settings, redis_conn)
    assert version_of_jobs(client, [alone, a, b]) == [[1], [2], [2]]
    assert batches(client) == {1: ["Mozart", "Curie"], 2: ["Newton", "Darwin"]}

    # an alone job queued between two others is a barrier: the later job waits for it
    c = post(client, request("Homer", 4))
    d = post(client, request("Dante", 5), batching="alone")
    e = post(client, request("Ada", 6))
    drain(settings, redis_conn)
    assert version_of_jobs(client, [c, d, e]) == [[3], [4], [5]]


def test_different_hparams_or_methods_are_not_mixed(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
) -> None:
    settings = configure(max_batch=8)
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    a = post(client, request("Mozart", 0), hparams={"v_lr": 0.5, "kl_factor": 0.1})
    b = post(client, request("Curie", 1), hparams={"kl_factor": 0.1, "v_lr": 0.5})  # same
    c = post(client, request("Newton", 2), hparams={"v_lr": 0.4})
    d = post(client, request("Darwin", 3), hparams={"v_lr": 0.4})
    drain(settings, redis_conn)
    assert version_of_jobs(client, [a, b, c, d]) == [[1], [1], [2], [2]]
    vs = harness.all_versions(client, MODEL)
    assert (vs[1]["hparams"]["v_lr"], vs[2]["hparams"]["v_lr"]) == (0.5, 0.4)

    # ROME takes one request per delta: its jobs are never batched
    rome = {**TINY_OVERRIDES["rome"], "v_num_grad_steps": 8, "mom2_adjustment": False}
    jobs = [
        client.post(
            f"/v1/models/{MODEL}/edits",
            json={"method": "rome", "hparams": rome, "requests": [request(n, i)]},
        ).json()["job_id"]
        for i, n in enumerate(["Homer", "Dante"])
    ]
    drain(settings, redis_conn)
    assert version_of_jobs(client, jobs) == [[3], [4]]


def test_max_wait_is_honoured(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
) -> None:
    # nothing else queued: the writer waits the whole window, then applies the one edit
    settings = configure(max_batch=2, max_wait_ms=400)
    client = app_client(settings)
    harness.start_worker(MODEL, settings)
    post(client, request("Mozart", 0))
    drain(settings, redis_conn)
    # a full batch is there at once: no waiting, even with a long window
    settings = configure(max_batch=2, max_wait_ms=20_000)
    harness.start_worker(MODEL, settings)
    post(client, request("Curie", 1))
    post(client, request("Newton", 2))
    t0 = time.monotonic()
    drain(settings, redis_conn)
    assert time.monotonic() - t0 < 15

    # a request sent while the writer waits joins its batch
    settings = configure(max_batch=2, max_wait_ms=20_000)
    harness.start_worker(MODEL, settings)
    first = post(client, request("Darwin", 3))
    late: dict[str, str] = {}

    def send_when_waiting() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and harness.job(client, first)["status"] != "running":
            time.sleep(0.01)
        time.sleep(0.2)
        late["job"] = post(client, request("Homer", 4))

    sender = threading.Thread(target=send_when_waiting)
    sender.start()
    drain(settings, redis_conn)
    sender.join(timeout=30)
    assert version_of_jobs(client, [first, late["job"]]) == [[3], [3]]

    waited = {}
    with session_scope(db_engine) as s:
        for v in s.scalars(select(Version).where(Version.number > 0)):
            waited[v.number] = v.timing["batch_wait_s"]
    assert 0.4 <= waited[1] < 3.0, waited
    assert waited[2] < 1.0, waited
    assert 0.2 <= waited[3] < 10.0, waited


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def test_a_failing_batch_fails_only_the_job_that_fails(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a batch holding Curie's request fails while it is computed (as a request the
    # model cannot take would)
    settings = configure(max_batch=2, source=gpt2_dir)
    client = app_client(settings)
    state = harness.start_worker(MODEL, settings)
    apply_batch = edit_job._apply_batch

    def failing(state: Any, job_id: str, editor: Any, method: str, hparams: Any,
                group: list[Edit], *rest: Any) -> Any:  # fmt: skip
        if any(e.subject == "Curie" for e in group):
            raise IndexError("index out of range in self")
        return apply_batch(state, job_id, editor, method, hparams, group, *rest)

    monkeypatch.setattr(edit_job, "_apply_batch", failing)
    ok1 = post(client, request("Mozart", 0))
    bad = post(client, request("Curie", 1))
    ok2 = post(client, request("Newton", 2))
    ok3 = post(client, request("Darwin", 3))
    drain(settings, redis_conn)

    # the batch [ok1, bad] failed; each job was tried again by itself
    failed = harness.job(client, bad)
    assert failed["status"] == "failed" and "index" in failed["error"].lower(), failed
    assert failed["result"] is None
    assert version_of_jobs(client, [ok1, ok2, ok3]) == [[1], [2], [2]]
    by_subject = {e["subject"]: e for e in edits(client)}
    assert by_subject["Curie"]["status"] == "failed"
    assert by_subject["Curie"]["reason"] == failed["error"]
    assert by_subject["Curie"]["version"] is None
    assert {e["status"] for s, e in by_subject.items() if s != "Curie"} == {"applied"}
    vs = harness.all_versions(client, MODEL)
    assert [v["number"] for v in vs] == [0, 1, 2]
    assert state.runtime.tensor_hashes(vs[2]["tensor_sha256"]) == vs[2]["tensor_sha256"]


# -- a worker killed mid-batch --------------------------------------------------------


def test_worker_killed_mid_batch_loses_nothing(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
    tmp_path: Path,
) -> None:
    settings = configure(max_batch=4)
    client = app_client(settings)
    # slow enough to kill the worker while it computes the second batch
    slow = {"v_num_grad_steps": 30, "v_prob_threshold": 1.0}
    jobs = [
        post(client, request("Mozart", 0), hparams=slow),
        post(client, request("Mozart", 1), hparams=slow),
        post(client, request("Curie", 2), hparams=slow),
        post(client, request("Mozart", 3), hparams=slow),
    ]  # batches: [Mozart, Curie], [Mozart], [Mozart]
    log = tmp_path / "worker.log"
    proc = harness.spawn_worker(settings, MODEL, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with session_scope(db_engine) as s:
                # the first batch committed and its jobs finished
                if s.get(Job, jobs[0]).status is JobStatus.succeeded:  # type: ignore[union-attr]
                    break
            time.sleep(0.01)
        else:
            pytest.fail(f"the worker made no version:\n{log.read_text()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    with session_scope(db_engine) as s:
        status = {j.id: j.status for j in s.scalars(select(Job))}
        assert s.scalar(select(Version.id).where(Version.number == 2)) is None, "killed too late"
    # the first batch is committed; the claimed jobs of the next ones are left running
    assert [status[j] for j in jobs] == [
        JobStatus.succeeded,
        JobStatus.running,
        JobStatus.succeeded,
        JobStatus.running,
    ]

    state = harness.start_worker(MODEL, settings)
    queue = Queue(settings.edit_queue(MODEL), connection=redis_conn)
    assert requeue_unfinished(state, queue) == 2
    drain(settings, redis_conn)
    assert version_of_jobs(client, jobs) == [[1], [2], [1], [3]]
    assert all(harness.job(client, j)["status"] == "succeeded" for j in jobs)
    head = harness.all_versions(client, MODEL)[-1]
    assert head["number"] == 3
    assert state.runtime.tensor_hashes(head["tensor_sha256"]) == head["tensor_sha256"]


def test_requeue_resets_a_claimed_job_whose_queue_entry_survived(
    configure: Callable[..., Settings],
    app_client: Callable[[Settings], TestClient],
    redis_conn: Redis,
    db_engine: Engine,
) -> None:
    # a worker died right after claiming b, before it deleted b's rq entry
    settings = configure(max_batch=4)
    client = app_client(settings)
    a = post(client, request("Mozart", 0))
    b = post(client, request("Curie", 1))
    with session_scope(db_engine) as s:
        job = s.get(Job, b)
        assert job is not None
        job.status = JobStatus.running
    state = harness.start_worker(MODEL, settings)
    queue = Queue(settings.edit_queue(MODEL), connection=redis_conn)
    assert requeue_unfinished(state, queue) == 1
    assert harness.job(client, b)["status"] == "queued"
    assert queue.job_ids == [a, b]  # nothing enqueued twice
    drain(settings, redis_conn)
    assert version_of_jobs(client, [a, b]) == [[1], [1]]


# -- the stream: 200 single edits from 20 concurrent HTTP clients ---------------------


@pytest.fixture
def served(
    configure: Callable[..., Settings], clean_db: Engine, redis_conn: Redis
) -> Iterator[tuple[str, Settings]]:
    """The API under a real uvicorn server (tests/served.py)."""
    settings = configure(max_batch=16, max_wait_ms=100)
    with serve(settings) as url:
        yield url, settings


def stream_requests(n: int, clients: int) -> list[dict[str, Any]]:
    """``n`` single facts, request ``i`` sent by client ``i % clients``. About one in
    six repeats a subject: either one its own client sent earlier (an update of
    that fact), or one that another client may be sending at the same moment (with
    other spacing)."""
    pairs = [(a, b) for a in NAMES for b in NAMES if a != b]
    subjects: list[str] = []
    for i in range(n):
        if i % (2 * clients) in (25, 29, 33):
            subject = subjects[i - clients]  # the same client, earlier
        elif i % 10 == 2 and i > 5:
            subject = subjects[i - 5].replace(" ", "   ")  # another client, about now
        else:
            subject = "{} {}".format(*pairs[i])
        subjects.append(subject)
    prompts = ("{} was born in", "{} lives in", "{} works in")
    return [request(subject, i, prompts[i % 3]) for i, subject in enumerate(subjects)]


def test_stream_of_single_edits_from_concurrent_clients_is_applied_in_batches(
    served: tuple[str, Settings], redis_conn: Redis, clean_db: Engine, measurements: list[str]
) -> None:
    url, settings = served
    max_batch = settings.models[MODEL].max_batch
    state = harness.start_worker(MODEL, settings)
    reqs = stream_requests(200, clients=20)
    job_of: dict[int, str] = {}  # request index → job id
    sent: dict[int, float] = {}
    accepted: dict[int, float] = {}
    errors: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(k, len(reqs), 20):
                body = {"method": "memit", "hparams": FAST, "requests": [reqs[i]]}
                sent[i] = time.monotonic()
                r = c.post(f"/v1/models/{MODEL}/edits", json=body)
                accepted[i] = time.monotonic()
                if r.status_code != 202:
                    errors.append(r.text)
                    continue
                job_of[i] = r.json()["job_id"]

    t0 = time.monotonic()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(20)]
    for t in clients:
        t.start()
    # the writer runs in this (main) thread meanwhile: rq's SimpleWorker needs it
    while any(t.is_alive() for t in clients) or pending(settings, redis_conn, clean_db):
        drain(settings, redis_conn)
        time.sleep(0.01)
    for t in clients:
        t.join()
    seconds = time.monotonic() - t0
    assert errors == [] and len(job_of) == 200

    with httpx.Client(base_url=url, timeout=60) as c:
        jobs = {i: c.get(f"/v1/jobs/{j}").json() for i, j in job_of.items()}
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = c.get(
                f"/v1/models/{MODEL}/edits",
                params={"limit": 500, **({"cursor": cursor} if cursor else {})},
            ).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        versions = [
            v for v in c.get(f"/v1/models/{MODEL}/versions", params={"limit": 500}).json()["items"]
        ]
    # every request ends applied (or rejected/failed with a reason)
    assert len(items) == 200
    for e in items:
        assert e["status"] == "applied" or (
            e["status"] in ("rejected", "failed") and e["reason"]
        ), e
    for job in jobs.values():
        assert job["status"] in ("succeeded", "failed"), job
    applied = [e for e in items if e["status"] == "applied"]
    assert len(applied) == 200  # nothing here should fail on the tiny model
    # versions within the policy: at most max_batch edits each, no subject twice
    per_version: dict[int, list[dict[str, Any]]] = {}
    for e in applied:
        per_version.setdefault(e["version"], []).append(e)
    sizes = [len(per_version[n]) for n in sorted(per_version)]
    assert max(sizes) <= max_batch
    for group in per_version.values():
        keys = [subject_key(e["subject"]) for e in group]
        assert len(keys) == len(set(keys)), keys
    assert sorted(per_version) == [v["number"] for v in versions[1:]]
    assert len(per_version) <= 200 // 4, sizes  # well below one version per request
    # a request about a subject sent after an earlier one about it was accepted is
    # applied after it (concurrent ones only in different versions)
    version_of = {i: jobs[i]["result"]["versions"][0] for i in jobs}
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        by_subject.setdefault(subject_key(r["subject"]), []).append(i)
    ordered = 0
    for same in by_subject.values():
        for a in same:
            for b in same:
                if accepted[a] < sent[b]:
                    assert version_of[a] < version_of[b], (reqs[a], reqs[b])
                    ordered += 1
    assert ordered >= 15 and sum(len(v) > 1 for v in by_subject.values()) == 34
    # each job's result names its version and the batch size
    for job in jobs.values():
        (batch,) = job["result"]["batches"]
        assert batch["size"] == len(per_version[batch["version"]])
        assert job["result"]["versions"] == [batch["version"]]

    # the final weights reproduce on a restarted worker
    head = versions[-1]
    assert state.runtime.tensor_hashes(head["tensor_sha256"]) == head["tensor_sha256"]
    restarted = harness.start_worker(MODEL, settings)
    assert restarted.runtime.current_version == head["number"]
    assert restarted.runtime.tensor_hashes(head["tensor_sha256"]) == head["tensor_sha256"]
    measurements.append(
        f"stream: 200 single edits from 20 HTTP clients -> {len(sizes)} versions "
        f"(sizes {dict(sorted(Counter(sizes).items()))}, max_batch {max_batch}) in {seconds:.1f} s"
    )


def pending(settings: Settings, redis: Redis, engine: Engine) -> bool:
    """Whether the edit queue or the ledger still has work."""
    if Queue(settings.edit_queue(MODEL), connection=redis).count:
        return True
    with session_scope(engine) as s:
        return (
            s.scalar(
                select(Edit.id)
                .join(Job)
                .where(Job.status.in_([JobStatus.queued, JobStatus.running]))
            )
            is not None
        )
