"""A worker's start-up inside its rq loop (workers/worker.py ``StartingWorker``):
reads are answered between start-up steps when the weights are the head, edits and
evaluations wait until start-up is done, and the worker's record in Redis says
where it is. Real Redis, real rq, real PostgreSQL for the tiny-model case."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job as RqJob
from sqlalchemy import Engine

from service import presence
from service.presence import Phase, Presence
from service.redis_clients import command_client
from service.settings import GuardPolicy, ModelSpec, Settings
from tests.tiny_models import tiny_model, word_tokenizer
from workers.editing.common.stats import Steps
from workers.state import needs_state
from workers.worker import StartingWorker, load_state, startup_steps

MODEL = "tiny"
EVENTS: list[str] = []


def record(what: str) -> str:
    """A job the tests enqueue: notes that it ran."""
    EVENTS.append(what)
    return what


@pytest.fixture(autouse=True)
def _events() -> Iterator[None]:
    EVENTS.clear()
    yield
    EVENTS.clear()


def _steps(n: int, fail_at: int | None = None) -> Steps[None]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("the statistics corpus is unreadable")
        EVENTS.append(f"step {i}")
        yield (i + 1) / n, f"step {i + 1} of {n}"


class RecordingPresence(Presence):
    """The real record in Redis, and the states it went through."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(command_client(settings.redis_url), settings.queue_prefix, MODEL, "w1")
        self.seen: list[tuple[str, float | None]] = []

    def set(self, state: Phase, **kw: Any) -> None:  # type: ignore[override]
        super().set(state, **kw)
        self.seen.append((state.value, kw.get("progress")))
        EVENTS.append(f"presence {state.value}")


def _queues(settings: Settings, redis: Redis) -> list[Queue]:
    return [
        Queue(settings.read_queue(MODEL), connection=redis),
        Queue(settings.edit_queue(MODEL), connection=redis),
        Queue(settings.eval_queue(MODEL), connection=redis),
    ]


def _worker(
    queues: list[Queue],
    steps: Steps[Any],
    reads_ok: bool,
    who: RecordingPresence,
    state: Any = None,
) -> StartingWorker:
    return StartingWorker(
        queues,
        startup=steps,
        read_queue=queues[0],
        reads_ok=reads_ok,
        presence=who,
        state=state,
        connection=queues[0].connection,
    )


def test_reads_are_answered_between_steps_and_edits_wait_for_the_end(
    settings: Settings, redis_conn: Redis
) -> None:
    reads, edits, evals = _queues(settings, redis_conn)
    evals.enqueue(f"{__name__}.record", "evaluation")
    edits.enqueue(f"{__name__}.record", "edit")
    reads.enqueue(f"{__name__}.record", "read 1")
    reads.enqueue(f"{__name__}.record", "read 2")
    who = RecordingPresence(settings)
    worker = _worker([reads, edits, evals], _steps(3), True, who)
    worker.work(burst=True)
    assert worker.startup_error is None
    ran = [e for e in EVENTS if not e.startswith("presence")]
    # the reads come first, before any start-up step; the edit only after the last step
    assert ran == ["read 1", "read 2", "step 0", "step 1", "step 2", "edit", "evaluation"]
    assert who.seen == [
        ("statistics", 1 / 3),
        ("statistics", 2 / 3),
        ("statistics", 1.0),
        ("ready", None),
    ]
    state = presence.model_worker(redis_conn, settings.queue_prefix, MODEL)
    assert (state.state, state.workers) == ("ready", 1)


def test_a_read_that_arrives_during_start_up_is_answered_at_the_next_step(
    settings: Settings, redis_conn: Redis
) -> None:
    reads, edits, evals = _queues(settings, redis_conn)

    def steps() -> Steps[None]:
        EVENTS.append("step 0")
        reads.enqueue(f"{__name__}.record", "read")  # a client asks meanwhile
        yield 0.5, "half"
        EVENTS.append("step 1")
        yield 1.0, "done"

    worker = _worker([reads, edits, evals], steps(), True, RecordingPresence(settings))
    worker.work(burst=True)
    assert [e for e in EVENTS if not e.startswith("presence")] == ["step 0", "read", "step 1"]


def test_reads_wait_for_the_end_when_the_weights_are_not_the_head(
    settings: Settings, redis_conn: Redis
) -> None:
    reads, edits, evals = _queues(settings, redis_conn)
    reads.enqueue(f"{__name__}.record", "read")
    worker = _worker([reads, edits, evals], _steps(2), False, RecordingPresence(settings))
    worker.work(burst=True)
    assert [e for e in EVENTS if not e.startswith("presence")] == ["step 0", "step 1", "read"]


def test_a_failed_start_up_stops_the_worker_and_runs_no_edit(
    settings: Settings, redis_conn: Redis
) -> None:
    reads, edits, evals = _queues(settings, redis_conn)
    edits.enqueue(f"{__name__}.record", "edit")
    who = RecordingPresence(settings)
    worker = _worker([reads, edits, evals], _steps(3, fail_at=1), True, who)
    worker.work(burst=True)
    assert isinstance(worker.startup_error, RuntimeError)
    assert [e for e in EVENTS if not e.startswith("presence")] == ["step 0"]
    assert edits.count == 1  # still queued, for the next worker
    assert ("ready", None) not in who.seen


@pytest.fixture
def tiny_settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    spec = ModelSpec(source=str(tiny_dir), guard=GuardPolicy(enabled=False))
    return model_settings(MODEL, spec, warm_statistics=True)


@needs_state
def score_and_record(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The worker's real score job, noting when it ran."""
    from workers.jobs import reads  # noqa: PLC0415

    EVENTS.append("read")
    return reads.score(state, **kwargs)


def test_a_real_start_up_answers_a_read_while_it_computes_the_statistics(
    tiny_settings: Settings, clean_db: Engine, redis_conn: Redis
) -> None:
    """The tiny model's real start-up: the statistics in steps, a score request
    answered between two of them at version 0, ready at the end."""
    state = load_state(MODEL, tiny_settings)
    reads, edits, evals = _queues(tiny_settings, redis_conn)
    who = RecordingPresence(tiny_settings)
    steps = startup_steps(state)
    next(steps)  # the first batch of the statistics: a read arrives now
    job = reads.enqueue(
        f"{__name__}.score_and_record",
        model=MODEL,
        prompts=["Mozart was born in"],
        targets=["Rome"],
    )
    worker = _worker([reads, edits, evals], steps, True, who, state)
    worker.work(burst=True)
    assert worker.startup_error is None
    result = RqJob.fetch(job.id, connection=redis_conn).latest_result()
    assert result is not None and result.return_value["version"] == 0
    # answered before the next step of the statistics, and long before ready
    after = EVENTS[EVENTS.index("read") + 1 :]
    assert after[0] == "presence statistics"
    assert after.count("presence statistics") >= 2
    assert after[-1] == "presence ready"


def test_using_the_model_between_statistics_steps_changes_nothing(
    tiny_settings: Settings,
) -> None:
    """No hook stays on the model between steps: forwards in between (the reads a
    starting worker answers) leave the statistics bit-identical."""
    import torch  # noqa: PLC0415

    from workers.editing.common.stats import (  # noqa: PLC0415
        compute_second_moments,
        second_moment_steps,
    )

    model = tiny_model("llama", seed=0)
    tok = word_tokenizer()
    params = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    plain, n_plain = compute_second_moments(model, tok, params, "self", 96, 12)
    steps = second_moment_steps(model, tok, params, "self", 96, 12)
    taken = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            stepped, n_stepped = done.value
            break
        taken += 1
        with torch.no_grad():
            model(input_ids=torch.tensor([tok("Mozart was born in")["input_ids"]]))
    assert taken >= 2 and n_stepped == n_plain
    for p in params:
        assert torch.equal(plain[p], stepped[p])
