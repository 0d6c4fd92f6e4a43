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
   queued, compares the metrics with the policy's thresholds
   (:func:`service.ledger.evaluations.store_result`): a breach records an alert, and
   with ``action: "rollback"`` queues a rollback job to the last healthy version.

The runtime is left at the evaluated version: every edit, rollback, score and
generate syncs to the ledger's head first, so the next one moves it back.

:func:`schedule` and :func:`enqueue` are the policy hook of the version commits
(:mod:`workers.jobs.edit`, :mod:`workers.jobs.rollback`): in the transaction that
commits version N, an evaluation job is added for every policy due at N; after the
commit they are queued.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from rq import get_current_job
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import queue
from service.errors import Unavailable
from service.jsonsafe import json_safe
from service.ledger import evaluations as ledger_evaluations
from service.ledger import versions as ledger_versions
from service.redis_clients import command_client
from service.suites import resolve_data_path
from workers.evaluation.suites import load_suite
from workers.jobs.common import JobCancelled, fail, progress, reason_of
from workers.state import WorkerState

log = logging.getLogger(__name__)

# params that name files or folders under the worker's data root
PATH_PARAMS = ("data_path", "data_dir")
# the downstream suite's task files when the client names no data_dir (as in ../shared/data)
DEFAULT_DOWNSTREAM_DIR = "downstream"


def run_evaluation(state: WorkerState, job_id: str) -> dict[str, Any]:
    """Run the evaluation of job ``job_id`` (already marked running by ``run_job``)."""
    t_start = time.perf_counter()
    try:
        with state.ledger() as s:
            ev = ledger_evaluations.start_evaluation(s, job_id)
            evaluation_id, target, suite = ev.id, ev.version, ev.suite
            params = dict(ev.params or {})
            records = ledger_versions.version_records(s, state.model_id)
            edits = (
                ledger_evaluations.chain_edit_cases(s, state.model_id, target)
                if suite == "retention"
                else []
            )
        rt = state.runtime
        progress(state, job_id, 0.0, f"moving to version {target}")
        if rt.current_version != target:
            rt.sync(records, target, state.store)
        t_sync = time.perf_counter() - t_start
        run_params = prepare_params(state, suite, params, edits)
        fn = load_suite(suite)

        def report(fraction: float, message: str) -> None:
            progress(state, job_id, 0.05 + 0.9 * fraction, f"{suite}: {message}")

        t0 = time.perf_counter()
        with torch.no_grad():
            raw = fn(rt.model, rt.tokenizer, run_params, progress=report)
        t_suite = time.perf_counter() - t0
        metrics, details = check_result(raw)
    except Exception as exc:
        _fail(state, job_id, exc)
        raise
    timing = {"sync_s": t_sync, "suite_s": t_suite, "total_s": time.perf_counter() - t_start}
    with state.ledger() as s:
        result, rollback_job = ledger_evaluations.store_result(
            s, job_id, evaluation_id, metrics, details, timing
        )
    if rollback_job is not None:
        _enqueue(state, [rollback_job], evaluation=False)
    log.info(
        "evaluation %d (%s) of version %d: %s", evaluation_id, suite, target, result["metrics"]
    )
    return result


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


def check_result(raw: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Check a suite's answer: ``{"metrics": {name: number}, "details": {...}}``.

    Returns the metrics as floats (non-finite values kept, so that thresholds see
    them) and the details as JSON (non-finite numbers as null).
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("metrics"), Mapping):
        raise ValueError("the suite must return {'metrics': {...}, 'details': {...}}")
    metrics: dict[str, float] = {}
    for name, value in raw["metrics"].items():
        v = value.item() if hasattr(value, "item") else value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"metric {name!r} is not a number ({type(value).__name__})")
        metrics[str(name)] = float(v)
    try:
        details = json_safe(raw.get("details") or {})
    except TypeError as exc:
        raise ValueError(f"the suite returned a value that is not JSON: {exc}") from exc
    json.dumps(details, allow_nan=False)
    return metrics, details


def _fail(state: WorkerState, job_id: str, exc: BaseException) -> None:
    fail(state, job_id, exc)
    if isinstance(exc, JobCancelled):
        return  # cancelled with its evaluation row
    with state.ledger() as s:
        ledger_evaluations.fail_evaluation(s, job_id, reason_of(exc))


# -- the policy hook of version commits -----------------------------------------------


def schedule(s: Session, state: WorkerState, number: int) -> list[str]:
    """Add the evaluation jobs the model's policies ask for after version ``number``
    (in the caller's transaction); returns their ids for :func:`enqueue`.

    Runs in a savepoint: a failure here is logged and schedules nothing, but never
    fails the version's commit (an edit must not be lost to its monitoring).
    """
    try:
        with s.begin_nested():
            return ledger_evaluations.schedule_policy_evaluations(s, state.model_id, number)
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
