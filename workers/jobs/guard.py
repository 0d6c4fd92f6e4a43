"""The guard in an edit job (docs/guard.md): the pipeline's :class:`~workers.pipeline.Guard`
over the ledger, and the ledger records of its decisions.

For each staged update the pipeline calls :meth:`LedgerGuard.before` on the parent
version (the canary, cached per version in :attr:`WorkerState.canary
<workers.state.WorkerState.canary>`, over a recall sample of earlier edits from the
ledger), :meth:`LedgerGuard.judge` on the staged update (the canary after, the
method's norm history from the ledger, the decision of
:func:`workers.evaluation.guard_rules.decide`) and, once the version is committed,
:meth:`LedgerGuard.committed`. The edit job records an accepted decision in the
version's transaction (:func:`record`) and a rejected one in its own
(:func:`record_rejection`), then marks the edits rejected (:func:`mark_rejected`)
once no retry is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.jsonsafe import json_safe
from service.ledger import edits as ledger_edits
from service.ledger import guard_decisions as ledger_guard
from service.ledger import jobs as ledger_jobs
from service.ledger.tables import Edit, GuardDecision
from workers.batching import subject_key
from workers.editing.types import EditRequest
from workers.evaluation.canary import Before, CanaryCache, CanaryMeasurement, RecallCase
from workers.evaluation.guard_rules import GuardVerdict, decide, norm_per_request
from workers.runtime import ModelRuntime, Staged
from workers.state import WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardCheck:
    """The guard's judgement of one staged update, with what it measured."""

    verdict: GuardVerdict
    before: Before
    after: CanaryMeasurement
    seconds: float  # the guard's cost for this update

    @property
    def accepted(self) -> bool:
        return self.verdict.accepted

    @property
    def reason(self) -> str | None:
        return self.verdict.reason

    def numbers(self) -> dict[str, Any]:
        """Every number, JSON-safe (non-finite ones as "inf"/"nan")."""
        return json_safe({**self.verdict.to_json(), "seconds": self.seconds}, "string")


class GuardRejected(Exception):
    """The guard rejected a staged update of a job (the pipeline discarded it).

    ``rows`` maps each edit id of the update to its metrics row: the CounterFact
    scores measured on the staged update and the guard's numbers.
    """

    def __init__(self, check: GuardCheck, decision_id: int, rows: dict[int, dict[str, Any]]):
        super().__init__(check.verdict.reason)
        self.check = check
        self.decision_id = decision_id
        self.rows = rows


class LedgerGuard:
    """:class:`workers.pipeline.Guard` for the updates of one method on the state's model."""

    def __init__(self, state: WorkerState, canary: CanaryCache, method: str) -> None:
        self.state, self.canary, self.method = state, canary, method

    def before(self, runtime: ModelRuntime, group: Sequence[Edit]) -> Before:
        version = runtime.current_version
        if version is None:
            raise RuntimeError("the runtime is at no known version")
        cases = recall_sample(self.state, group)
        return self.canary.before(runtime.model, runtime.tokenizer, version, cases)

    def judge(
        self, runtime: ModelRuntime, staged: Staged, group: Sequence[Edit], prior: Before
    ) -> GuardCheck:
        t0 = time.perf_counter()
        after = self.canary.after(runtime.model, runtime.tokenizer, prior)
        policy = self.state.spec.guard
        with self.state.ledger() as s:
            history = ledger_guard.norm_history(
                s, self.state.model_id, self.method, policy.norm_window
            )
        verdict = decide(
            update_norm=staged.update_norm,
            n_requests=len(group),
            history=[norm_per_request(norm, size) for norm, size in history],
            before=prior.measurement,
            after=after,
            policy=policy,
        )
        check = GuardCheck(verdict, prior, after, prior.seconds + time.perf_counter() - t0)
        log.info(
            "guard %s the update of edits %s on version %d (%.3f s): %s",
            "accepted" if verdict.accepted else "REJECTED",
            [e.id for e in group], prior.version, check.seconds,
            verdict.reason or "all rules passed",
        )  # fmt: skip
        return check

    def committed(self, judgement: GuardCheck, number: int) -> None:
        self.canary.committed(number, judgement.after)


def for_job(state: WorkerState, method: str) -> LedgerGuard | None:
    """The guard of ``method``'s updates, or None when the model's guard is off."""
    if not state.spec.guard.enabled or state.canary is None:
        return None
    return LedgerGuard(state, state.canary, method)


def recall_sample(state: WorkerState, group: Sequence[Edit]) -> list[RecallCase]:
    """Up to ``canary_edits`` applied edits of the model (the ledger's md5 sample),
    without those about a subject of ``group`` and those with no known true target."""
    subjects = {subject_key(e.subject) for e in group}
    with state.ledger() as s:
        rows = ledger_edits.recall_candidates(s, state.model_id, state.spec.guard.canary_edits)
        cases = []
        for e in rows:
            true = e.target_true or (e.metrics or {}).get("target_true_inferred")
            if not true or subject_key(e.subject) in subjects:
                continue
            text = EditRequest(prompt=e.prompt, subject=e.subject, target_new=e.target_new).text
            cases.append(RecallCase(int(e.id), text, e.target_new, str(true)))
    return cases


def record(
    s: Session,
    state: WorkerState,
    job_id: str,
    method: str,
    group: Sequence[Edit],
    check: GuardCheck,
    version_id: int | None,
    extra: dict[str, Any] | None = None,
) -> GuardDecision:
    """Add the decision's row in session ``s`` (the version's transaction if accepted)."""
    return ledger_guard.record_decision(
        s,
        state.model_id,
        job_id,
        version_id=version_id,
        parent_number=check.before.version,
        method=method,
        accepted=check.verdict.accepted,
        reason=check.verdict.reason,
        rules=check.verdict.rules,
        edit_ids=[int(e.id) for e in group],
        numbers=check.verdict.numbers,
        measurements=json_safe({**check.numbers(), **(extra or {})}, "string"),
        seconds=check.seconds,
    )


def record_rejection(
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
    with state.ledger() as s:
        decision_id = record(s, state, job_id, method, group, check, None, extra).id
    guard = {**check.numbers(), "decision_id": decision_id}
    metrics = {
        int(e.id): json_safe({**row, "guard": guard}, "string")
        for e, row in zip(group, rows, strict=True)
    }
    return GuardRejected(check, decision_id, metrics)


def mark_rejected(state: WorkerState, exc: GuardRejected) -> None:
    """Mark the update's edits ``rejected`` with the reason and the numbers, and add
    the rejection to each job's result (``result.rejected``)."""
    reason = exc.check.verdict.reason
    with state.ledger() as s:
        by_job = ledger_edits.mark_rejected(s, exc.rows, reason)
        ledger_jobs.add_rejection_results(
            s,
            by_job,
            {
                "reason": reason,
                "rules": list(exc.check.verdict.rules),
                "guard_decision_id": exc.decision_id,
            },
        )
