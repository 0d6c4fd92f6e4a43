"""Evaluation jobs: run a suite on one ledger version, store the result, act on policies.

:func:`workers.jobs.run_job` hands a job of kind ``evaluation`` to
:func:`run_evaluation`, which

1. moves the worker's :class:`~workers.runtime.ModelRuntime` to the evaluated
   version (any version: the runtime rebuilds it from the ledger, hash-checked);
2. prepares the suite's params: data paths resolved against ``Settings.data_root``
   (a path outside it fails the job), and for ``retention`` the edits applied on
   that version's chain, in the order they were applied;
3. runs the suite (:func:`workers.evaluation.suites.load_suite`) under
   ``torch.no_grad``;
4. stores metrics and details on the evaluation row and, for a run that a policy
   queued, compares the metrics with the policy's thresholds: a breach records an
   alert, and with ``action: "rollback"`` queues a rollback job to the last healthy
   version (:func:`_rollback_plan`).

The runtime is left at the evaluated version: every edit, rollback, score and
generate syncs to the ledger's head first, so the next one moves it back.

:func:`schedule` and :func:`enqueue` are the policy hook of the version commits in
:mod:`workers.jobs`: in the transaction that commits version N, an evaluation job is
added for every policy due at N; after the commit they are queued.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from rq import get_current_job
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import ledger, queue
from service.errors import Unavailable
from service.evaluations import breaches, resolve_data_path
from service.ledger.sessions import session_scope
from service.ledger.tables import Edit, Evaluation, Job, JobKind, JobStatus, Model, Version
from service.redis_clients import command_client
from workers import jobs, startup
from workers.evaluation.suites import load_suite
from workers.runtime import VersionRecord
from workers.worker import WorkerState

log = logging.getLogger(__name__)

# params that name files or folders under the worker's data root
PATH_PARAMS = ("data_path", "data_dir")
# the downstream suite's task files when the client names no data_dir (as in ../shared/data)
DEFAULT_DOWNSTREAM_DIR = "downstream"


def _now() -> datetime:
    return datetime.now(UTC)


# -- running one evaluation -------------------------------------------------------------


def run_evaluation(state: WorkerState, job_id: str) -> dict[str, Any]:
    """Run the evaluation of job ``job_id`` (already marked running by ``run_job``)."""
    engine = jobs._engine(state)
    t_start = time.perf_counter()
    try:
        with session_scope(engine) as s:
            ev = s.scalar(select(Evaluation).where(Evaluation.job_id == job_id))
            if ev is None:
                raise LookupError(f"job {job_id} has no evaluation row")
            ev.status = JobStatus.running
            ev.started_at = ev.started_at or _now()
            evaluation_id, target, suite = ev.id, ev.version, ev.suite
            params = dict(ev.params or {})
            records = startup.version_records(s, state.model_id)
            edits = chain_edits(s, state.model_id, records, target) if suite == "retention" else []
        rt = state.runtime
        jobs._progress(state, job_id, 0.0, f"moving to version {target}")
        if rt.current_version != target:
            rt.sync(records, target, state.store)
        t_sync = time.perf_counter() - t_start
        run_params = prepare_params(state, suite, params, edits)
        fn = load_suite(suite)

        def report(fraction: float, message: str) -> None:
            jobs._progress(state, job_id, 0.05 + 0.9 * fraction, f"{suite}: {message}")

        t0 = time.perf_counter()
        with torch.no_grad():
            raw = fn(rt.model, rt.tokenizer, run_params, progress=report)
        t_suite = time.perf_counter() - t0
        metrics, details = check_result(raw)
    except Exception as exc:
        _fail(state, job_id, exc)
        raise
    timing = {"sync_s": t_sync, "suite_s": t_suite, "total_s": time.perf_counter() - t_start}
    result, rollback_job = _store(state, job_id, evaluation_id, metrics, details, timing)
    if rollback_job is not None:
        _enqueue(state, [rollback_job], evaluation=False)
    log.info(
        "evaluation %d (%s) of version %d: %s", evaluation_id, suite, target, result["metrics"]
    )
    return result


def chain_edits(
    s: Session, model_id: int, records: Mapping[int, VersionRecord], number: int
) -> list[dict[str, Any]]:
    """The edits applied on version ``number``'s chain, in the order they were
    applied (version, then acceptance order), as the retention suite reads them.

    The chain, not the edits' current status, decides: evaluating a version that a
    later rollback left behind still sees the edits it held. An edit whose client
    gave no target_true carries the one its edit job inferred.
    """
    chain = startup.chain(dict(records), number)
    rows = s.execute(
        select(Edit, Version.number)
        .join(Version, Version.id == Edit.version_id)
        .where(Version.model_id == model_id, Version.number.in_(chain))
        .order_by(Version.number, Edit.id)
    ).all()
    return [
        {
            "edit_id": e.id,
            "prompt": e.prompt,
            "subject": e.subject,
            "target_new": e.target_new,
            "target_true": e.target_true or (e.metrics or {}).get("target_true_inferred"),
            "version": n,
        }
        for e, n in rows
    ]


def prepare_params(
    state: WorkerState, suite: str, params: Mapping[str, Any], edits: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The suite's params as it gets them: paths made absolute inside the data root
    (``ValueError`` for a path outside it; ``downstream`` reads ``<root>/downstream``
    unless given a ``data_dir``), the chain's edits for ``retention``."""
    out = dict(params)
    if suite == "downstream" and out.get("data_dir") is None:
        out["data_dir"] = DEFAULT_DOWNSTREAM_DIR
    for key in PATH_PARAMS:
        if out.get(key) is not None:
            out[key] = str(resolve_data_path(state.settings.data_root, str(out[key])))
    if suite == "retention":
        out["edits"] = [dict(e) for e in edits]
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON (Postgres' JSONB has no NaN/inf: those become null)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return _finite_or_none(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    raise ValueError(f"the suite returned a value that is not JSON: {type(obj).__name__}")


def check_result(raw: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Check a suite's answer: ``{"metrics": {name: number}, "details": {...}}``.

    Returns the metrics as floats (non-finite values kept, so that thresholds see
    them) and the details as JSON.
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("metrics"), Mapping):
        raise ValueError("the suite must return {'metrics': {...}, 'details': {...}}")
    metrics: dict[str, float] = {}
    for name, value in raw["metrics"].items():
        v = value.item() if hasattr(value, "item") else value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"metric {name!r} is not a number ({type(value).__name__})")
        metrics[str(name)] = float(v)
    details = _jsonable(raw.get("details") or {})
    json.dumps(details, allow_nan=False)
    return metrics, details


def _store(
    state: WorkerState,
    job_id: str,
    evaluation_id: int,
    metrics: dict[str, float],
    details: dict[str, Any],
    timing: dict[str, float],
) -> tuple[dict[str, Any], str | None]:
    """Write the result, the threshold verdict and any rollback job in one transaction."""
    stored = {k: _finite_or_none(v) for k, v in metrics.items()}
    non_finite = {k: str(v) for k, v in metrics.items() if not math.isfinite(v)}
    if non_finite:
        details = {**details, "non_finite_metrics": non_finite}
    rollback_job: str | None = None
    with session_scope(jobs._engine(state)) as s:
        ev = s.get(Evaluation, evaluation_id)
        assert ev is not None
        spec = ev.policy_spec or {}
        passed: bool | None = None
        alert: dict[str, Any] | None = None
        thresholds = spec.get("thresholds") or {}
        if thresholds:
            bad, missing = breaches(metrics, thresholds)
            passed = not bad and not missing
            if not passed:
                alert = {
                    "policy": ev.policy,
                    "breaches": _jsonable(bad),
                    "missing": missing,
                    "action": spec.get("action", "alert"),
                    "raised_at": _now().isoformat(),
                }
                if bad and spec.get("action") == "rollback":
                    rollback_job, outcome = _queue_rollback(s, state, ev)
                    alert.update(outcome)
        values: dict[str, Any] = {
            "status": JobStatus.succeeded,
            "metrics": stored,
            "details": details,
            "timing": timing,
            "finished_at": _now(),
            "passed": passed,
        }
        if alert is not None:
            values["alert"] = alert
        s.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(**values))
        result = {
            "evaluation_id": evaluation_id,
            "suite": ev.suite,
            "version": ev.version,
            "metrics": stored,
            "passed": passed,
            "alert": alert,
        }
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.succeeded,
                progress=1.0,
                message=None,
                result=result,
                finished_at=_now(),
            )
        )
    if alert is not None:
        log.warning("evaluation %d raised an alert: %s", evaluation_id, alert)
    return result, rollback_job


def _fail(state: WorkerState, job_id: str, exc: BaseException) -> None:
    jobs._fail(state, job_id, exc)
    with session_scope(jobs._engine(state)) as s:
        s.execute(
            update(Evaluation)
            .where(Evaluation.job_id == job_id)
            .values(
                status=JobStatus.failed, error=f"{type(exc).__name__}: {exc}", finished_at=_now()
            )
        )


# -- rollback to the last healthy version --------------------------------------------


def _rollback_plan(s: Session, state: WorkerState, ev: Evaluation) -> tuple[int | None, str]:
    """Where a rollback after ``ev``'s breach goes, or ``None`` and why not.

    The rule (docs/api.md, "Evaluation policies"):

    - only while the evaluated version is still in effect, i.e. on the head's chain:
      if someone already rolled back past it, its state no longer serves; versions
      committed on top of it since are rolled back too (they were applied to a model
      that breached its thresholds);
    - not while another rollback job of the model is queued or running;
    - to the last healthy version: the latest version before the evaluated one, on
      its chain, whose run of the same policy passed; else the base version 0.
    """
    records = startup.version_records(s, state.model_id)
    head = max(records)
    if ev.version not in startup.chain(records, head):
        return None, (
            f"version {ev.version} is no longer in effect (head {head} does not build on it)"
        )
    pending = s.scalar(
        select(Job.id).where(
            Job.model_id == state.model_id,
            Job.kind == JobKind.rollback,
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    if pending is not None:
        return None, f"rollback job {pending} is already pending"
    earlier = sorted(n for n in startup.chain(records, ev.version) if n < ev.version)
    healthy = s.scalars(
        select(Evaluation.version).where(
            Evaluation.model_id == state.model_id,
            Evaluation.policy == ev.policy,
            Evaluation.status == JobStatus.succeeded,
            Evaluation.passed.is_(True),
            Evaluation.version.in_(earlier),
        )
    ).all()
    target = max(healthy, default=0)
    if target == ev.version:
        return None, "the evaluated version is the base version"
    return target, "last healthy version" if healthy else "no earlier run passed: the base"


def _queue_rollback(s: Session, state: WorkerState, ev: Evaluation) -> tuple[str | None, dict]:
    target, why = _rollback_plan(s, state, ev)
    if target is None:
        log.warning("evaluation %d: no rollback (%s)", ev.id, why)
        return None, {"rollback": None, "rollback_skipped": why}
    model = s.get(Model, state.model_id)
    assert model is not None
    job = ledger.create_rollback_job(s, model.name, target)
    job.payload = {
        **job.payload,
        "trigger": {"evaluation_id": ev.id, "policy": ev.policy, "version": ev.version},
    }
    s.flush()
    log.warning(
        "evaluation %d of version %d breached policy %s: rollback job %s to version %d (%s)",
        ev.id, ev.version, ev.policy, job.id, target, why,
    )  # fmt: skip
    return job.id, {"rollback": {"job_id": job.id, "to_version": target, "reason": why}}


# -- the policy hook of version commits -----------------------------------------------


def schedule(s: Session, state: WorkerState, number: int) -> list[str]:
    """Add the evaluation jobs the model's policies ask for after version ``number``
    (in the caller's transaction); returns their ids for :func:`enqueue`.

    Runs in a savepoint: a failure here is logged and schedules nothing, but never
    fails the version's commit (an edit must not be lost to its monitoring).
    """
    try:
        with s.begin_nested():
            return ledger.schedule_policy_evaluations(s, state.model_id, number)
    except (SQLAlchemyError, LookupError, ValueError):
        log.exception("could not schedule the policy evaluations of version %d", number)
        return []


def enqueue(state: WorkerState, job_ids: Sequence[str]) -> None:
    """Queue committed evaluation jobs on the model's evaluation queue."""
    _enqueue(state, job_ids, evaluation=True)


def _enqueue(state: WorkerState, job_ids: Sequence[str], *, evaluation: bool) -> None:
    """Best effort: a job that Redis did not take stays queued in the ledger and
    :func:`workers.startup.requeue_unfinished` queues it when a worker starts."""
    if not job_ids:
        return
    current = get_current_job()
    conn = current.connection if current is not None else command_client(state.settings.redis_url)
    put = queue.enqueue_evaluation if evaluation else queue.enqueue_job
    for job_id in job_ids:
        try:
            put(conn, state.settings, state.name, job_id)
        except Unavailable:
            log.warning("job %s is in the ledger but not queued", job_id, exc_info=True)
