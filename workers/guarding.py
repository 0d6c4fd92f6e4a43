"""The guard in the edit path: ledger reads, canary caching and ledger writes around
the pure decision of :mod:`workers.evaluation.guard` (docs/guard.md).

An edit job (``workers/jobs.py``) calls, for each staged update:

1. :func:`before` on the parent version, before staging: the canary of version N
   (perplexity of the fixed texts, recall of a sample of earlier edits). It is
   cached per version in the worker's cache, so a run of edits measures each
   version once: the canary measured on an accepted update becomes the next one's
   "before", and only edits that enter the sample later are scored anew.
2. :func:`judge` on the staged update: the canary after, the norm history of the
   method from the ledger, the decision.
3. Accepted: :func:`record` inside the version's transaction and :func:`accepted`
   once the runtime committed. Rejected: :func:`rejection` records the decision and
   builds the :class:`GuardRejected` the job raises (the runtime discards the stage);
   :func:`mark_rejected` marks the edits ``rejected`` once no retry is left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, cast, func, select

from service.ledger.sessions import get_engine, session_scope
from service.ledger.tables import Edit, EditStatus, GuardDecision, Job, Version, VersionKind
from workers.batching import subject_key
from workers.editing.types import EditRequest
from workers.evaluation import canary
from workers.evaluation.canary import CanaryMeasurement, RecallCase
from workers.evaluation.guard import GuardVerdict, decide, norm_per_request
from workers.worker import WorkerState

log = logging.getLogger(__name__)

_CACHE_KEY = "guard_canary"


class GuardRejected(Exception):
    """The guard rejected a staged update (the job discards it).

    ``rows`` maps each edit id of the update to its metrics row: the CounterFact
    scores measured on the staged update and the guard's numbers.
    """

    def __init__(self, check: GuardCheck, decision_id: int, rows: dict[int, dict[str, Any]]):
        super().__init__(check.verdict.reason)
        self.check = check
        self.decision_id = decision_id
        self.rows = rows


@dataclass
class Before:
    """The canary of the parent version, over the recall sample ``cases``."""

    version: int
    measurement: CanaryMeasurement
    cases: list[RecallCase]
    seconds: float  # spent measuring now (0 when all was cached)


@dataclass
class GuardCheck:
    verdict: GuardVerdict
    before: Before
    after: CanaryMeasurement
    seconds: float  # the guard's cost for this update

    def numbers(self) -> dict[str, Any]:
        return _json_safe({**self.verdict.to_json(), "seconds": self.seconds})


def _json_safe(value: Any) -> Any:
    """JSONB holds no Infinity/NaN: non-finite floats become strings ("inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _engine(state: WorkerState):  # noqa: ANN202
    return get_engine(state.settings.database_url)


def enabled(state: WorkerState) -> bool:
    return state.spec.guard.enabled


# -- ledger reads ------------------------------------------------------------------------
def norm_history(state: WorkerState, method: str) -> list[float]:
    """Norms per request of the model's latest accepted updates of ``method`` (edit
    versions with a positive norm), oldest first, at most ``norm_window``."""
    policy = state.spec.guard
    with session_scope(_engine(state)) as s:
        rows = s.execute(
            select(Version.update_norm, Version.info["batch"]["size"].as_integer())
            .where(
                Version.model_id == state.model_id,
                Version.kind == VersionKind.edit,
                Version.method == method,
                Version.update_norm > 0,
            )
            .order_by(Version.number.desc())
            .limit(policy.norm_window)
        ).all()
    return [norm_per_request(float(norm), int(size or 1)) for norm, size in reversed(rows)]


def recall_sample(state: WorkerState, group: Sequence[Edit]) -> list[RecallCase]:
    """Up to ``canary_edits`` applied edits of the model, without those about a
    subject of ``group`` and those with no known true target.

    The sample is the applied edits with the smallest md5(id): a deterministic,
    uniform sample of the whole history that is stable as it grows (a new edit
    replaces at most one member), so the canary cached for a version is reused and
    only a new member is scored anew.
    """
    k = state.spec.guard.canary_edits
    if k == 0:
        return []
    subjects = {subject_key(e.subject) for e in group}
    with session_scope(_engine(state)) as s:
        rows = s.scalars(
            select(Edit)
            .where(Edit.model_id == state.model_id, Edit.status == EditStatus.applied)
            .order_by(func.md5(cast(Edit.id, String)))
            .limit(k)
        ).all()
        cases = []
        for e in sorted(rows, key=lambda e: e.id):
            true = e.target_true or (e.metrics or {}).get("target_true_inferred")
            if not true or subject_key(e.subject) in subjects:
                continue
            text = EditRequest(prompt=e.prompt, subject=e.subject, target_new=e.target_new).text
            cases.append(RecallCase(int(e.id), text, e.target_new, str(true)))
    return cases


# -- measuring ------------------------------------------------------------------------------
def before(state: WorkerState, group: Sequence[Edit]) -> Before | None:
    """The canary of the current version over this update's recall sample (None when
    the guard is off). Call it before staging."""
    if not enabled(state):
        return None
    rt = state.runtime
    version = rt.current_version
    if version is None:
        raise RuntimeError("the runtime is at no known version")
    t0 = time.perf_counter()
    texts = canary.canary_texts(state.spec.guard.canary_texts)
    cache = state.cache.get(_CACHE_KEY)
    if cache is None or cache["version"] != version or cache["texts"] != len(texts):
        m = canary.measure(rt.model, rt.tokenizer, texts)
        cache = {"version": version, "texts": len(texts), "base": m, "recall": {}}
        state.cache[_CACHE_KEY] = cache
    cases = recall_sample(state, group)
    missing = [c for c in cases if c.key not in cache["recall"]]
    cache["recall"].update(canary.measure_recall(rt.model, rt.tokenizer, missing))
    base: CanaryMeasurement = cache["base"]
    measurement = CanaryMeasurement(
        perplexity=base.perplexity,
        tokens=base.tokens,
        recall={c.key: cache["recall"][c.key] for c in cases},
    )
    return Before(version, measurement, cases, time.perf_counter() - t0)


def judge(
    state: WorkerState, method: str, group: Sequence[Edit], update_norm: float, prior: Before
) -> GuardCheck:
    """Measure the canary on the staged update and decide."""
    rt = state.runtime
    t0 = time.perf_counter()
    texts = canary.canary_texts(state.spec.guard.canary_texts)
    after = canary.measure(rt.model, rt.tokenizer, texts, prior.cases)
    verdict = decide(
        update_norm=update_norm,
        n_requests=len(group),
        history=norm_history(state, method),
        before=prior.measurement,
        after=after,
        policy=state.spec.guard,
    )
    seconds = prior.seconds + time.perf_counter() - t0
    check = GuardCheck(verdict, prior, after, seconds)
    log.info(
        "guard %s the update of edits %s on version %d (%.3f s): %s",
        "accepted" if verdict.accepted else "REJECTED",
        [e.id for e in group], prior.version, seconds, verdict.reason or "all rules passed",
    )  # fmt: skip
    return check


def accepted(state: WorkerState, check: GuardCheck | None, number: int) -> None:
    """The update became version ``number``: its canary is that version's."""
    if check is None:
        return
    state.cache[_CACHE_KEY] = {
        "version": number,
        "texts": state.spec.guard.canary_texts,
        "base": CanaryMeasurement(check.after.perplexity, check.after.tokens),
        "recall": dict(check.after.recall),
    }


# -- ledger writes ---------------------------------------------------------------------
def record(
    s: Any,
    state: WorkerState,
    job_id: str,
    method: str,
    group: Sequence[Edit],
    check: GuardCheck,
    version_id: int | None,
    extra: dict[str, Any] | None = None,
) -> GuardDecision:
    """Add the decision's row in session ``s`` (the version's transaction if accepted)."""
    n = check.verdict.numbers

    def num(key: str) -> float | None:
        v = n.get(key)
        return float(v) if isinstance(v, int | float) else None

    row = GuardDecision(
        model_id=state.model_id,
        job_id=job_id,
        version_id=version_id,
        parent_number=check.before.version,
        method=method,
        accepted=check.verdict.accepted,
        reason=check.verdict.reason,
        rules=list(check.verdict.rules),
        edit_ids=[int(e.id) for e in group],
        update_norm=num("update_norm"),
        norm_median=num("norm_median"),
        norm_ratio=num("norm_ratio"),
        perplexity_before=num("perplexity_before"),
        perplexity_after=num("perplexity_after"),
        recall_before=num("recall_before"),
        recall_after=num("recall_after"),
        measurements=_json_safe({**check.numbers(), **(extra or {})}),
        seconds=check.seconds,
    )
    s.add(row)
    s.flush()
    return row


def rejection(
    state: WorkerState,
    job_id: str,
    method: str,
    group: Sequence[Edit],
    check: GuardCheck,
    rows: Sequence[dict[str, Any]],
) -> GuardRejected:
    """Record a rejected update's decision (its own transaction) and return the
    exception for the job to raise. ``rows`` are the edits' metrics rows (the
    CounterFact scores before and on the staged update)."""
    jobs = list(dict.fromkeys(e.job_id for e in group))
    extra = {"batch_jobs": len(jobs), "retried_per_job": len(jobs) > 1}
    with session_scope(_engine(state)) as s:
        decision_id = record(s, state, job_id, method, group, check, None, extra).id
    guard = {**check.numbers(), "decision_id": decision_id}
    metrics = {
        int(e.id): _json_safe({**row, "guard": guard}) for e, row in zip(group, rows, strict=True)
    }
    return GuardRejected(check, decision_id, metrics)


def mark_rejected(state: WorkerState, exc: GuardRejected) -> None:
    """Mark the update's edits ``rejected`` with the reason and the numbers, and add
    the rejection to each job's result (``result.rejected``)."""
    reason = exc.check.verdict.reason
    with session_scope(_engine(state)) as s:
        edits = s.scalars(select(Edit).where(Edit.id.in_(list(exc.rows)))).all()
        by_job: dict[str, list[int]] = {}
        for e in edits:
            e.status = EditStatus.rejected
            e.reason = reason
            e.metrics = exc.rows[int(e.id)]
            by_job.setdefault(e.job_id, []).append(int(e.id))
        for jid, ids in by_job.items():
            job = s.get(Job, jid)
            if job is None:
                continue
            old = job.result or {}
            job.result = {
                **old,
                "versions": old.get("versions", []),
                "rejected": [
                    *old.get("rejected", []),
                    {
                        "edit_ids": sorted(ids),
                        "reason": reason,
                        "rules": list(exc.check.verdict.rules),
                        "guard_decision_id": exc.decision_id,
                    },
                ],
            }
