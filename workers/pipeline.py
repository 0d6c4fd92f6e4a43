"""The edit pipeline: one update from requests to a committed version, as plain
functions over a :class:`~workers.runtime.ModelRuntime`. The rq edit job
(:mod:`workers.jobs.edit`) and every benchmark (``bench/_editrun.py``) call it;
nothing else computes, stages, judges or commits an update.

An update's life (:func:`apply_update`):

1. **measure before** (optional): the caller's scores on the unedited state;
2. **compute**: the editor's :class:`~workers.editing.types.WeightDelta` for the
   requests, timed in wall and CPU seconds; a non-finite delta is refused;
3. **guard before** (optional): what the guard compares against, on the current
   version (:class:`Guard`);
4. **stage**: the delta applied tentatively (the runtime can go back bit for bit);
5. **measure after** (optional);
6. **judge** (optional): the guard's verdict on the staged update; a rejected update
   is discarded unless the guard only observes (``enforce=False``);
7. **commit**: the caller's ``commit`` callback records the version (the ledger's
   transaction for a job; nothing for a benchmark) and returns its number, then the
   runtime moves to it. Anything raised before the runtime moved discards the stage.

What happens around an update — which requests go together (``workers.batching``),
where the model is synced from, what a rejection means for a job — belongs to the
callers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.editing.types import EditContext, EditRequest, WeightDelta
from workers.runtime import ModelRuntime, Staged

Scores = list[dict[str, Any]]
Measure = Callable[[ModelRuntime], Scores]


class Judgement(Protocol):
    """A guard's verdict on one staged update."""

    @property
    def accepted(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...


class Guard(Protocol):
    """A guard against disabling edits, consulted on every staged update.

    ``group`` is the caller's view of the update's requests (ledger edits for a job,
    data-set records for a benchmark), passed through unchanged.
    """

    def before(self, runtime: ModelRuntime, group: Sequence[Any]) -> Any:
        """What :meth:`judge` compares against, measured on the current version."""

    def judge(
        self, runtime: ModelRuntime, staged: Staged, group: Sequence[Any], prior: Any
    ) -> Judgement:
        """The verdict on ``staged`` (the model holds it)."""

    def committed(self, judgement: Judgement, number: int) -> None:
        """The judged update became version ``number`` (accepted, or committed anyway
        because the guard only observes): what was measured on it is that version's."""


class NonFiniteDelta(ValueError):
    """The editor computed an update with non-finite values; nothing was applied."""


@dataclass
class Computed:
    delta: WeightDelta
    seconds: float
    cpu_seconds: float


@dataclass
class Outcome:
    """What :func:`apply_update` did. ``number`` is the committed version (None when
    the guard rejected the update); ``timing`` has ``compute_s``, ``compute_cpu_s``,
    ``measure_before_s``, ``measure_after_s``, ``guard_s``, ``guard_cpu_s`` (before
    and judge together) and ``apply_s`` (stage, and commit or discard)."""

    staged: Staged
    number: int | None
    judgement: Judgement | None
    before: Scores | None
    after: Scores | None
    delta: WeightDelta
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.number is not None


def compute(
    runtime: ModelRuntime,
    editor: Any,
    hparams: Any,
    requests: Sequence[EditRequest],
    ctx: EditContext,
) -> Computed:
    """The editor's delta for ``requests`` on the current weights (the model comes
    back unchanged: the editor's contract)."""
    t0, c0 = time.perf_counter(), time.process_time()
    delta: WeightDelta = editor.compute_delta(
        runtime.model, runtime.tokenizer, list(requests), hparams, ctx
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not delta.is_finite():
        raise NonFiniteDelta("the computed update is not finite; nothing was applied")
    return Computed(delta, seconds, cpu)


def apply_update(
    runtime: ModelRuntime,
    editor: Any,
    hparams: Any,
    requests: Sequence[EditRequest],
    ctx: EditContext,
    *,
    group: Sequence[Any] = (),
    measure: Measure | None = None,
    guard: Guard | None = None,
    enforce: bool = True,
    commit: Callable[[Staged, Outcome], int] | None = None,
    on_phase: Callable[[str], None] | None = None,
    keep: bool = True,
) -> Outcome:
    """Compute, stage, measure, judge and commit one update (the module docstring).

    ``commit(staged, outcome)`` records the version and returns its number (default:
    ``staged.number``, nothing recorded); it sees the outcome's measurements and
    judgement. ``on_phase`` hears "measuring before", "computing", "measuring after"
    and "committing" (progress messages). With ``keep`` False the update is measured
    and judged on the staged weights, then discarded (a trial: each request alone on
    the same weights). Returns the :class:`Outcome`; a rejected update (``enforce``)
    or a trial is discarded and has ``number`` None.
    """
    say = on_phase or (lambda phase: None)
    timing: dict[str, float] = {
        "measure_before_s": 0.0,
        "measure_after_s": 0.0,
        "guard_s": 0.0,
        "guard_cpu_s": 0.0,
    }
    before = None
    if measure is not None:
        say("measuring before")
        t0 = time.perf_counter()
        before = measure(runtime)
        timing["measure_before_s"] = time.perf_counter() - t0
    say("computing")
    computed = compute(runtime, editor, hparams, requests, ctx)
    timing["compute_s"], timing["compute_cpu_s"] = computed.seconds, computed.cpu_seconds
    prior = None
    if guard is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        prior = guard.before(runtime, group)
        timing["guard_s"] += time.perf_counter() - t0
        timing["guard_cpu_s"] += time.process_time() - c0
    t0 = time.perf_counter()
    staged = runtime.stage(computed.delta)
    timing["apply_s"] = time.perf_counter() - t0
    outcome = Outcome(staged, None, None, before, None, computed.delta, timing)
    try:
        if measure is not None:
            say("measuring after")
            t0 = time.perf_counter()
            outcome.after = measure(runtime)
            timing["measure_after_s"] = time.perf_counter() - t0
        if guard is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            outcome.judgement = guard.judge(runtime, staged, group, prior)
            timing["guard_s"] += time.perf_counter() - t0
            timing["guard_cpu_s"] += time.process_time() - c0
        if not keep or (
            outcome.judgement is not None and enforce and not outcome.judgement.accepted
        ):
            t0 = time.perf_counter()
            runtime.discard(staged)
            timing["apply_s"] += time.perf_counter() - t0
            return outcome
        say("committing")
        t0 = time.perf_counter()
        number = commit(staged, outcome) if commit is not None else staged.number
    except BaseException:
        runtime.discard(staged)
        raise
    runtime.commit(staged, number)
    timing["apply_s"] += time.perf_counter() - t0
    outcome.number = number
    if guard is not None and outcome.judgement is not None:
        guard.committed(outcome.judgement, number)
    return outcome
