"""The seed experiment of issue 4: gradual then catastrophic forgetting under sequential
edits, and the guard that stops the disabling edits.

    python bench/forgetting.py --methods rome_original rome memit --n 200 --every 10 \\
        --threads 1 --out bench/results/forgetting/
    python bench/forgetting.py --methods rome_original --n 200 --guard --out ...
    python bench/forgetting.py --methods rome_original --guard --guard-mode observe ...
    python bench/forgetting.py --guard-report --out bench/results/forgetting/
    python bench/forgetting.py --plot-only --table --out bench/results/forgetting/

Gupta et al. 2024 ("Model editing at scale leads to gradual and catastrophic
forgetting"; "Rebuilding ROME") edit a model one fact at a time and evaluate every
10 edits: earlier edits fade and downstream skills erode (gradual), then one
"disabling edit" with an update norm orders of magnitude above the others collapses
the model (catastrophic); the original ROME code (``rome_original``) produces them,
r-ROME (``rome``) does not. This replays it on SmolLM2 with the first ``--n``
records of ``counterfact_disabling.jsonl`` (rebuilding-rome's 5,000-record sample,
ascending case_id, the order their ``evaluate.py`` walks it; ``../shared/data/README.md``).

Each method runs in its own process through ``bench/_editrun.py``'s loop (the one
``bench/sequential.py`` uses; ROME takes one request per delta, the batched methods
``--batch-size`` records per delta, default 1 as the study). Every ``--every``
edits a checkpoint records retention (the fraction of all edits so far whose
target_new still beats target_true on its rewrite prompt, and which are forgotten),
the window's ES/PS/NS, the drift ‖W − W₀‖_F / rows of every edited layer, and the
downstream suite (``workers.evaluation.downstream.run_suite``, ``--downstream``
params; run on the unedited model too). Every delta's update norm is in the log. If
the downstream module cannot be imported, the run goes on without it and its log
says why (``info.evaluation``).

``--guard`` consults the service's guard (``bench/_canary_guard.py``: the decision of
``workers.evaluation.guard_rules`` on the canary of ``workers.evaluation.canary`` under the
``GuardPolicy`` of ``service.settings``; ``--guard-policy`` overrides it) before each
delta is committed: a rejected delta is discarded, the model stays where it was, and
the log holds the verdict and its numbers. ``--guard-mode observe`` logs the
verdicts but applies every delta: the unguarded run, judged. Each verdict also
carries the probe (perplexity of fixed texts the canary does not use) before and
after the delta; ``--guard-report`` counts the collapsing updates (canary perplexity,
or else the probe's, more than doubled, or downstream macro halved within a window)
the guard flagged and the ordinary ones it flagged wrongly (``<out>/guard.json``). Without the
guard's modules ``--guard`` exits with a message saying so. Runs are named
``<method>-b<batch>-n<N>[-guard|-observe]``.

The JSON log ``<out>/<run>.json`` has ``bench/sequential.py``'s fields (the same
loop) plus ``baseline_evaluation`` and, per checkpoint, ``evaluation`` (the
suite's ``{"metrics", "details"}``), and with ``--guard`` each batch's ``guard``
verdicts; ``--resume`` continues a cut run. Plots: ``forgetting.png`` (retention,
downstream macro score, update norm of every edit on a log scale, largest layer
drift, against the number of edits; rejected edits marked ×) and ``drift.png`` (a
panel per edited layer).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

from bench._canary_guard import (  # noqa: E402
    GuardUnavailable,
    guard_report,
    json_object,
    load_guard,
    report_table,
)
from bench._editrun import (  # noqa: E402
    CACHE,
    DATA,
    LOG_FORMAT,
    MODEL_SOURCE,
    Evaluate,
    GuardHook,
    _fmt,
    drift_figure,
    git_head,
    load_records,
    pyplot,
    run_sequential,
    save_figure,
)
from workers.editing.common.stats import StatsCache  # noqa: E402
from workers.models.loading import weights_fingerprint  # noqa: E402

BENCH = "forgetting"
RECORDS_FILE = "counterfact_disabling.jsonl"
METHODS = ("rome_original", "rome", "memit")
DOWNSTREAM = "workers.evaluation.downstream:run_suite"


# -- the evaluation step (pluggable) --------------------------------------------------------


def load_evaluation(
    spec: str = DOWNSTREAM, params: Mapping[str, Any] | None = None
) -> tuple[Evaluate | None, str | None]:
    """``(evaluate, None)`` for a suite ``"module:function"`` with the suites'
    signature ``run_suite(model, tok, params, progress=None) -> {"metrics", "details"}``,
    or ``(None, reason)`` when it cannot be imported (the run goes on without it)."""
    module_name, _, attr = spec.partition(":")
    try:
        run_suite = getattr(importlib.import_module(module_name), attr or "run_suite")
    except (ImportError, AttributeError) as exc:
        return None, f"{spec} is not available: {type(exc).__name__}: {exc}"
    suite_params = dict(params or {})

    def evaluate(model: torch.nn.Module, tok: Any) -> dict[str, Any]:
        result = run_suite(model, tok, suite_params)
        return {"metrics": dict(result["metrics"]), "details": result.get("details", {})}

    return evaluate, None


def macro_score(evaluation: Mapping[str, Any] | None) -> float | None:
    """The suite's headline macro average (``macro_f1``, else the first ``macro*``)."""
    metrics = (evaluation or {}).get("metrics") or {}
    if metrics.get("macro_f1") is not None:
        return float(metrics["macro_f1"])
    for key in sorted(metrics):
        if key.startswith("macro") and metrics[key] is not None:
            return float(metrics[key])
    return None


# -- the run --------------------------------------------------------------------------------


GUARD_SUFFIX = {None: "", "enforce": "-guard", "observe": "-observe"}


def forgetting_run_name(
    method: str, batch_size: int, n: int, guard_mode: str | None, tag: str = ""
) -> str:
    """``<method>-b<batch>-n<N>[-<tag>]``, with ``-guard`` when the guard rejects and
    ``-observe`` when it only judges."""
    return f"{method}-b{batch_size}-n{n}" + (f"-{tag}" if tag else "") + GUARD_SUFFIX[guard_mode]


def run_forgetting(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict[str, Any]],
    method: str,
    out_dir: Path,
    *,
    batch_size: int = 1,
    every: int = 10,
    guard: GuardHook | None = None,
    guard_enforce: bool = True,
    evaluate: Evaluate | None = None,
    stats_cache: StatsCache | None = None,
    overrides: dict[str, Any] | None = None,
    max_minutes: float | None = None,
    resume: bool = False,
    info: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """One method's sequential run (the module docstring says what is logged); the
    model is left at the last accepted edit. ``tag`` goes into the run's name."""
    mode = None if guard is None else "enforce" if guard_enforce else "observe"
    return run_sequential(
        model, tok, records, method, batch_size, out_dir,
        every=every, stats_cache=stats_cache, overrides=overrides, max_minutes=max_minutes,
        resume=resume, info=info, echo=echo,
        name=forgetting_run_name(method, batch_size, len(records), mode, tag),
        header_extra={"bench": BENCH, "guarded": mode == "enforce", "guard_mode": mode},
        guard=guard, guard_enforce=guard_enforce, evaluate=evaluate,
    )  # fmt: skip


# -- reading the logs -----------------------------------------------------------------------


def load_logs(out_dir: Path) -> list[dict[str, Any]]:
    logs = []
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if (
            isinstance(data, dict)
            and data.get("format") == LOG_FORMAT
            and data.get("bench") == BENCH
        ):
            logs.append(data)
    logs.sort(key=lambda g: (METHODS.index(g["method"]) if g["method"] in METHODS else 99,
                             g["method"], g["guarded"], g["batch_size"], g["n"]))  # fmt: skip
    return logs


def _positions(log: dict[str, Any]) -> dict[int, int]:
    """case_id → its edit number (1-based, in the order the run took the records)."""
    ids = [c for b in log["batches"] for c in b["case_ids"]]
    return {c: i + 1 for i, c in enumerate(ids)}


def edit_norms(log: dict[str, Any]) -> list[tuple[int, float, bool]]:
    """(edit number, update norm, applied) of every delta that was staged: from the
    guard's verdicts when there are any (a delta the guard only observed is applied
    whatever its verdict), else the applied deltas in order (one per
    ``len(applied) / len(update_norms)`` records)."""
    pos = _positions(log)
    out: list[tuple[int, float, bool]] = []
    for b in log["batches"]:
        if "guard" in b:
            for v in b["guard"]:
                applied = v["accepted"] or not v.get("enforced", True)
                out.append((max(pos[c] for c in v["case_ids"]), v["update_norm"], applied))
            continue
        norms, applied = b["update_norms"], b["applied"]
        if not norms:
            continue
        size = max(1, len(applied) // len(norms))
        for i, norm in enumerate(norms):
            out.append((max(pos[c] for c in applied[i * size : (i + 1) * size]), norm, True))
    return out


def flagged_edits(log: dict[str, Any]) -> list[tuple[int, float]]:
    """(edit number, update norm) of the deltas an observing guard would have
    rejected (they were applied)."""
    pos = _positions(log)
    return [
        (max(pos[c] for c in v["case_ids"]), v["update_norm"])
        for b in log["batches"]
        for v in b.get("guard", [])
        if not v["accepted"] and not v.get("enforced", True)
    ]


def rejected_edits(log: dict[str, Any]) -> list[int]:
    """Edit numbers of the rejected deltas (guard, editor or runtime refusals)."""
    pos = _positions(log)
    return sorted(max(pos[c] for c in r["case_ids"]) for b in log["batches"] for r in b["rejected"])


def summary(log: dict[str, Any]) -> dict[str, Any]:
    ckpts = log["checkpoints"]
    norms = [n for _, n, ok in edit_norms(log) if ok]
    macros = [macro_score(c.get("evaluation")) for c in ckpts]
    macros = [m for m in macros if m is not None]
    last = ckpts[-1] if ckpts else {}
    drift = last.get("drift") or {}
    return {
        "run": log["run"],
        "status": log["status"],
        "edits": sum(len(b["case_ids"]) for b in log["batches"]),
        "n": log["n"],
        "rejected": [c for b in log["batches"] for r in b["rejected"] for c in r["case_ids"]],
        "retention": last.get("retention"),
        "retention_min": min(
            (c["retention"] for c in ckpts if c["retention"] is not None), default=None
        ),  # fmt: skip
        "macro_baseline": macro_score(log.get("baseline_evaluation")),
        "macro_final": macros[-1] if macros else None,
        "macro_min": min(macros) if macros else None,
        "norm_median": statistics.median(norms) if norms else None,
        "norm_max": max(norms) if norms else None,
        "max_drift": max(drift.values()) if drift else None,
    }


def table(logs: Sequence[dict[str, Any]]) -> str:
    """Markdown: per run the edits done and rejected, final (lowest) retention, the
    downstream macro score unedited → final (lowest), the median and largest accepted
    update norm, and the largest layer drift at the end."""
    lines = [
        "| run | edits | rejected | retention final (min) | downstream macro: unedited → final "
        "(min) | update norm median / max | max drift |",
        "|---|---|---|---|---|---|---|",
    ]
    for log in logs:
        s = summary(log)
        done = f"{s['edits']}/{s['n']}" + ("" if s["status"] == "complete" else f" ({s['status']})")
        rejected = f"{len(s['rejected'])}" + (f": {s['rejected'][:8]}" if s["rejected"] else "")
        lines.append(
            f"| {s['run']} | {done} | {rejected} "
            f"| {_fmt(s['retention'], 2)} ({_fmt(s['retention_min'], 2)}) "
            f"| {_fmt(s['macro_baseline'], 3)} → {_fmt(s['macro_final'], 3)} "
            f"({_fmt(s['macro_min'], 3)}) "
            f"| {_fmt(s['norm_median'], 3)} / {_fmt(s['norm_max'], 3)} "
            f"| {_fmt(s['max_drift'], 5)} |"
        )
    return "\n".join(lines)


def write_guard_reports(out_dir: Path, logs: Sequence[dict[str, Any]]) -> str:
    """``bench._canary_guard.guard_report`` of every run the guard judged, written to
    ``<out>/guard.json``; returns the markdown table."""
    reports = [
        guard_report(g, macro=macro_score, judge=judge)
        for g in logs
        if any(b.get("guard") for b in g["batches"])
        for judge in ("canary", "probe")
    ]
    (out_dir / "guard.json").write_text(json.dumps(reports, indent=1) + "\n")
    return report_table(reports)


# -- plots ----------------------------------------------------------------------------------


def plot_logs(out_dir: Path, logs: Sequence[dict[str, Any]] | None = None) -> list[Path]:
    """``forgetting.png`` (four panels against the number of edits, one line per run,
    rejected edits marked ×) and ``drift.png`` (a panel per edited layer)."""
    plt = pyplot()
    logs = list(load_logs(out_dir) if logs is None else logs)
    runs = [g["run"] for g in logs]

    def style(g: dict[str, Any]) -> dict[str, Any]:
        return {
            "color": f"C{runs.index(g['run']) % 10}",
            "linestyle": "--" if g["guarded"] else "-",
            "marker": ".",
            "label": g["run"],
        }

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (ax_ret, ax_down), (ax_norm, ax_drift) = axes
    for g in logs:
        st = style(g)
        ck = g["checkpoints"]
        rejected = rejected_edits(g)
        ret = [(c["edits"], c["retention"]) for c in ck if c["retention"] is not None]
        if ret:
            ax_ret.plot(*zip(*ret, strict=True), **st)
        down = [(0, macro_score(g.get("baseline_evaluation")))]
        down += [(c["edits"], macro_score(c.get("evaluation"))) for c in ck]
        down = [(x, y) for x, y in down if y is not None]
        if down:
            ax_down.plot(*zip(*down, strict=True), **st)
        norms = edit_norms(g)
        ok = [(x, n) for x, n, a in norms if a and n > 0]
        if ok:
            ax_norm.plot(*zip(*ok, strict=True), color=st["color"], linestyle=st["linestyle"],
                         linewidth=0.8, marker=".", markersize=3, label=g["run"])  # fmt: skip
        bad = [(x, n) for x, n, a in norms if not a and n > 0]
        if bad:
            ax_norm.scatter(*zip(*bad, strict=True), color=st["color"], marker="x", s=40, zorder=3)
        seen = flagged_edits(g)
        if seen:
            ax_norm.scatter(*zip(*seen, strict=True), facecolors="none", edgecolors=st["color"],
                            marker="o", s=60, zorder=3)  # fmt: skip
        drift = [(c["edits"], max(c["drift"].values())) for c in ck if c["drift"]]
        if drift:
            drift.insert(0, (0, 0.0))  # the unedited model
            ax_drift.plot(*zip(*drift, strict=True), **st)
        for ax in (ax_ret, ax_down, ax_drift):
            for x in rejected:
                ax.axvline(x, color=st["color"], linestyle=":", linewidth=0.7, alpha=0.6)
    if any(rejected_edits(g) for g in logs):
        ax_norm.scatter([], [], color="grey", marker="x", label="rejected (not applied)")
    if any(flagged_edits(g) for g in logs):
        ax_norm.scatter([], [], facecolors="none", edgecolors="grey", marker="o",
                        label="flagged by the observing guard (applied)")  # fmt: skip
        ax_ret.plot([], [], color="grey", linestyle=":", label="a rejected edit")
    for ax, title in (
        (ax_ret, "retention: edits so far still holding"),
        (ax_down, "downstream macro score (0 edits: unedited)"),
        (ax_norm, "update norm ‖ΔW‖_F of every edit"),
        (ax_drift, "largest layer drift ‖W − W₀‖_F / rows"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("number of edits")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.lines or ax.collections:
            ax.legend(fontsize=7)
    ax_ret.set_ylim(-0.03, 1.03)
    ax_norm.set_yscale("log")
    if not any(
        macro_score(c.get("evaluation")) is not None for g in logs for c in g["checkpoints"]
    ):
        reason = next((g.get("info", {}).get("evaluation") for g in logs), None)
        ax_down.text(0.5, 0.5, f"no downstream scores\n{reason or ''}"[:200], ha="center",
                     va="center", wrap=True, fontsize=8, transform=ax_down.transAxes)  # fmt: skip
    fig.suptitle("sequential editing: gradual and catastrophic forgetting (Gupta et al. 2024)")
    written = [save_figure(fig, out_dir / "forgetting.png", plt)]
    fig = drift_figure(plt, logs, style)
    written.append(save_figure(fig, out_dir / "drift.png", plt, tight=False))
    return written


# -- command line ---------------------------------------------------------------------------


def _one(args: argparse.Namespace) -> None:
    """One method's run in this process (started by :func:`main`)."""
    from workers.models.loading import load_model  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    guard = load_guard(args.guard_policy) if args.guard else None
    mode = args.guard_mode if args.guard else None
    evaluate, unavailable = (None, "--no-downstream")
    if not args.no_downstream:
        evaluate, unavailable = load_evaluation(args.evaluation, args.downstream)
    if unavailable:
        print(f"downstream evaluation off: {unavailable}", flush=True)
    t0 = time.perf_counter()
    lm = load_model(MODEL_SOURCE, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    records = picked_records(args)
    info = {
        "model": MODEL_SOURCE,
        "records": str(args.data / RECORDS_FILE),
        "case_ids": str(args.case_ids) if args.case_ids else None,
        "evaluation": unavailable or f"{args.evaluation} {json.dumps(args.downstream)}",
        "guard_policy": args.guard_policy if args.guard else None,
        "guard_mode": mode,
        "command": "python bench/forgetting.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_head(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_load_s": round(load_s, 1),
    }
    run_forgetting(
        lm.model, lm.tokenizer, records, args.one, args.out,
        batch_size=args.batch_size, every=args.every, guard=guard,
        guard_enforce=mode != "observe", evaluate=evaluate,
        stats_cache=StatsCache(args.cache_dir / "stats", weights_fingerprint(lm.model)),
        max_minutes=args.max_minutes, resume=args.resume, info=info,
        echo=lambda message: print(message, flush=True), tag="picked" if args.case_ids else "",
    )  # fmt: skip


def picked_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The first ``--n`` records, or those of ``--case-ids`` in its order."""
    if not args.case_ids:
        return load_records(args.data / RECORDS_FILE, args.n)
    ids = json.loads(args.case_ids.read_text())
    by_id = {r["case_id"]: r for r in load_records(args.data / RECORDS_FILE, -1)}
    missing = [c for c in ids if c not in by_id]
    if missing:
        sys.exit(f"{args.case_ids}: case ids not in {RECORDS_FILE}: {missing[:5]}")
    return [by_id[c] for c in ids]


def main(argv: Sequence[str] | None = None) -> None:
    from workers.editing.hparams import METHODS as ALL  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL)
    ap.add_argument("--n", type=int, default=200, help="records (edits) per run")
    ap.add_argument("--case-ids", type=Path,
                    help="a JSON list of case ids to edit in its order instead of the first --n "
                    "(bench/rome_denominators.py --sequence-out)")  # fmt: skip
    ap.add_argument("--every", type=int, default=10, help="edits between checkpoints")
    ap.add_argument("--batch-size", type=int, default=1, help="records per batch (not ROME)")
    ap.add_argument("--guard", action="store_true", help="reject edits with the service's guard")
    ap.add_argument("--guard-mode", choices=("enforce", "observe"), default="enforce",
                    help="observe: log the guard's verdicts but apply every edit")  # fmt: skip
    ap.add_argument("--guard-policy", type=json_object, default={}, help="GuardPolicy overrides")
    ap.add_argument("--evaluation", default=DOWNSTREAM, help="the suite, module:function")
    ap.add_argument("--downstream", type=json_object, default=None,
                    help='its params (default {"data_dir": <data>/downstream, "limit": 100})')  # fmt: skip
    ap.add_argument("--no-downstream", action="store_true", help="retention and norms only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / BENCH)
    ap.add_argument("--data", type=Path, default=DATA, help=f"folder of {RECORDS_FILE}")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="model and statistics cache")
    ap.add_argument("--max-minutes", type=float, help="per run: stop at a checkpoint in time")
    ap.add_argument("--resume", action="store_true", help="continue runs from their logs")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from the logs")
    ap.add_argument("--table", action="store_true", help="print the summary table of the logs")
    ap.add_argument("--guard-report", action="store_true",
                    help="print the guard's decisions against the collapses, write guard.json")  # fmt: skip
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.downstream is None:
        args.downstream = {"data_dir": str(args.data / "downstream"), "limit": 100}
    if args.plot_only or args.table or args.guard_report:
        logs = load_logs(args.out)
        if not logs:
            sys.exit(f"no forgetting-benchmark logs in {args.out}")
        if args.plot_only:
            for path in plot_logs(args.out, logs):
                print(f"wrote {path}")
        if args.table:
            print(table(logs))
        if args.guard_report:
            print(write_guard_reports(args.out, logs))
        return
    if args.guard:
        try:
            load_guard(args.guard_policy)
        except GuardUnavailable as exc:
            sys.exit(str(exc))
    if args.one:
        _one(args)
        return
    if not (args.data / RECORDS_FILE).is_file():
        sys.exit(f"{args.data / RECORDS_FILE} not found (set --data)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for method in args.methods:
        cmd = [sys.executable, __file__, "--one", method, "--n", str(args.n),
               "--every", str(args.every), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--out", str(args.out), "--data", str(args.data),
               "--cache-dir", str(args.cache_dir), "--evaluation", args.evaluation,
               "--downstream", json.dumps(args.downstream)]  # fmt: skip
        if args.no_downstream:
            cmd.append("--no-downstream")
        if args.case_ids:
            cmd += ["--case-ids", str(args.case_ids)]
        if args.guard:
            cmd += ["--guard", "--guard-mode", args.guard_mode,
                    "--guard-policy", json.dumps(args.guard_policy)]  # fmt: skip
        if args.max_minutes is not None:
            cmd += ["--max-minutes", str(args.max_minutes)]
        if args.resume:
            cmd.append("--resume")
        mode = args.guard_mode if args.guard else None
        n = len(json.loads(args.case_ids.read_text())) if args.case_ids else args.n
        tag = "picked" if args.case_ids else ""
        print(f"== {forgetting_run_name(method, args.batch_size, n, mode, tag)}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, check=False)
        print(f"== exit {done.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
    logs = load_logs(args.out)
    if logs:
        for path in plot_logs(args.out, logs):
            print(f"wrote {path}")
        print(table(logs))
        if any(b.get("guard") for g in logs for b in g["batches"]):
            print(write_guard_reports(args.out, logs))


if __name__ == "__main__":
    main()
