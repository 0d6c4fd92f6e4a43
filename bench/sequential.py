"""Editing at scale: N sequential edits of CounterFact records on SmolLM2, per method
and batch size, measured every ``--every`` edits (issue 3, item 4).

    python bench/sequential.py --methods rome memit --batch-sizes 1 16 64 --n 1000 \\
        --every 25 --threads 1 --out bench/results/sequential/
    python bench/sequential.py --plot-only --out bench/results/sequential/
    python bench/sequential.py --table --out bench/results/sequential/

Each (method, batch size) runs in its own process, one after the other. The first
``--n`` records of ``counterfact_dev.jsonl`` (file order, known to the model or not)
are split into batches in order; a record whose subject is already in the batch goes
to the next batch (MEMIT-style solves conflict on one subject). Every delta is
applied through ``workers.runtime.ModelRuntime`` (``stage``/``commit``), so method
state such as AlphaEdit's accumulated keys (``aux``) is carried as in the service;
a method that takes one request per delta (``max_requests_per_delta``, ROME) gets
one delta per record of the batch. A delta the editor or the runtime refuses (an
``EditError``, a non-finite update) is logged as rejected and not applied.

A checkpoint follows the first batch boundary at least ``--every`` edits after the
previous one, and the last batch. It records, for the window of records edited since
the previous checkpoint, efficacy/paraphrase/neighbourhood (CounterFact ES/PS/NS as
``../shared/data/README.md`` defines them, scored after the window's edits; the same
records' unedited scores beside them); retention: the fraction of all edits so far
whose target_new still beats target_true on its rewrite prompt, and the case_ids
that no longer do; the drift ‖W − W₀‖_F / rows of every edited parameter
(``ModelRuntime.drift``, Gupta et al. 2024); the update norm of each delta; seconds
per edit (``compute_delta`` only: wall clock, and this process's CPU time, which other
work on a shared machine does not inflate at one thread) and, separately, the
evaluation time; peak RSS (of the whole process, statistics included).
Scoring is batched (``paired_target_logprobs``: one input serves both targets) and
retention scores rewrite prompts only.

The JSON log ``<out>/<method>-b<batch>-n<N>.json`` is rewritten after each
checkpoint (with a snapshot of the edited weights and method state under
``<out>/state/``), so a run that is stopped keeps what it measured, and ``--resume``
continues it from its last checkpoint. ``--max-minutes`` stops a run at the
checkpoint after which the next window would not fit, and records that it was cut.
PNG plots of every curve against the number of edits (Gupta et al. 2024, "Model
editing at scale leads to gradual and catastrophic forgetting", Figs. 1–3) are
drawn from all logs in ``--out``; ``--table`` prints the markdown summary.

``--observe-guard`` runs the service's guard (``bench/_canary_guard.py``) on every delta in
observe mode: its verdicts, canary and probe are logged but every delta is committed,
so the curves are the method's own; ``--guard-report`` counts its false rejections
(issue 4: the guard on ordinary edits) into ``<out>/guard.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

# the loop, the scoring and the state snapshots are shared with bench/forgetting.py;
# the names below are this module's interface (tests and other benches import them)
from bench._canary_guard import guard_report, json_object, load_guard, report_table  # noqa: E402
from bench._editrun import (  # noqa: E402, F401
    CACHE,
    DATA,
    LOG_FORMAT,
    MODEL_SOURCE,
    ResumeError,
    _fmt,
    _mean,
    drift_figure,
    git_head,
    load_records,
    plan_batches,
    pyplot,
    request_of,
    run_name,
    run_sequential,
    save_figure,
    score_records,
    unedited_scores,
)
from workers.editing.common.stats import StatsCache  # noqa: E402
from workers.models.loading import weights_fingerprint  # noqa: E402

LAST = 100  # the summary's "last 100 edits" and "first/last 100 edits"


# -- summary and plots ----------------------------------------------------------------------


def load_logs(out_dir: Path) -> list[dict[str, Any]]:
    logs = []
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == LOG_FORMAT and "run" in data:
            logs.append(data)
    logs.sort(key=lambda g: (g["method"], g["batch_size"], g["n"]))
    return logs


def _last_windows(
    ckpts: Sequence[dict[str, Any]],
    value: Callable[[dict[str, Any]], float | None],
    *,
    first: bool = False,
) -> float | None:
    """Mean of ``value`` over the windows of the last (``first``: the first) ≥ LAST
    edits, weighted by the edits each window applied (windows without a value are
    left out)."""
    tail, count = [], 0
    for c in ckpts if first else reversed(ckpts):
        if count >= LAST:
            break
        v = value(c)
        if v is not None:
            tail.append((v, c["window_applied"]))
        count += c["window_edits"]
    weight = sum(w for _, w in tail)
    return sum(v * w for v, w in tail) / weight if weight else None


def _ns_change(c: dict[str, Any]) -> float | None:
    if c["neighborhood"] is None or c["unedited_neighborhood"] is None:
        return None
    return c["neighborhood"] - c["unedited_neighborhood"]


def summary(log: dict[str, Any]) -> dict[str, Any]:
    """One run's summary row (see :func:`table`)."""
    ckpts = log["checkpoints"]
    last = ckpts[-1] if ckpts else {}
    applied = [c for b in log["batches"] for c in b["applied"]]
    forgotten = set(last.get("forgotten_case_ids", []))
    last_ids = applied[-LAST:]
    ends, edits = [], 0
    for b in log["batches"]:
        edits += len(b["case_ids"])
        ends.append(edits)
    # batches within the first / the last LAST edits (at least one batch each)
    first = [i for i, e in enumerate(ends) if e <= max(LAST, ends[0])] if ends else []
    end = [i for i, e in enumerate(ends) if e > edits - LAST]

    def median_per_edit(idx: list[int], key: str) -> float | None:
        vals = [log["batches"][i].get(key) for i in idx]
        per = [
            v / len(log["batches"][i]["case_ids"])
            for i, v in zip(idx, vals, strict=True)
            if v is not None
        ]
        return statistics.median(per) if per else None

    drift = last.get("drift") or {}
    return {
        "run": log["run"],
        "method": log["method"],
        "batch_size": log["batch_size"],
        "edits": edits,
        "n": log["n"],
        "status": log["status"],
        "rejected": sum(len(r["case_ids"]) for b in log["batches"] for r in b["rejected"]),
        **{k: last.get(k) for k in ("efficacy", "paraphrase", "neighborhood", "retention")},
        **{f"unedited_{k}": last.get(f"unedited_{k}") for k in ("efficacy", "paraphrase", "neighborhood")},
        # efficacy of the last ≥ LAST edits as scored right after their window
        "last_efficacy_at_edit": _last_windows(ckpts, lambda c: c["efficacy"]),
        "last_efficacy_at_end": (
            sum(c not in forgotten for c in last_ids) / len(last_ids) if last_ids and ckpts else None
        ),
        "max_drift": max(drift.values()) if drift else None,
        "s_per_edit_start": median_per_edit(first, "compute_s"),
        "s_per_edit_end": median_per_edit(end, "compute_s"),
        "cpu_s_per_edit_start": median_per_edit(first, "compute_cpu_s"),
        "cpu_s_per_edit_end": median_per_edit(end, "compute_cpu_s"),
        "eval_s": sum(c["eval_s"] for c in ckpts),
        "peak_rss_gb": last.get("peak_rss_gb"),
    }  # fmt: skip


def table(logs: Sequence[dict[str, Any]]) -> str:
    """Markdown: per run the edits done, the final window's ES/PS/NS (unedited in
    brackets), efficacy of the last 100 edits (scored after their window / at the
    end), final retention, the largest drift, median s/edit over the first and the
    last 100 edits (CPU seconds in brackets), evaluation time and peak RSS."""
    lines = [
        "| run | edits | final window ES | PS | NS | ES last 100 (at edit / at end) "
        "| retention | max drift | s/edit first → last 100 (CPU s) | eval | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for log in logs:
        s = summary(log)
        done = f"{s['edits']}/{s['n']}" + ("" if s["status"] == "complete" else f" ({s['status']})")
        if s["rejected"]:
            done += f", {s['rejected']} rejected"
        lines.append(
            f"| {s['method']} batch {s['batch_size']} | {done} "
            f"| {_fmt(s['efficacy'], 2)} ({_fmt(s['unedited_efficacy'], 2)}) "
            f"| {_fmt(s['paraphrase'], 2)} ({_fmt(s['unedited_paraphrase'], 2)}) "
            f"| {_fmt(s['neighborhood'], 2)} ({_fmt(s['unedited_neighborhood'], 2)}) "
            f"| {_fmt(s['last_efficacy_at_edit'], 2)} / {_fmt(s['last_efficacy_at_end'], 2)} "
            f"| {_fmt(s['retention'], 2)} | {_fmt(s['max_drift'], 4)} "
            f"| {_fmt(s['s_per_edit_start'], 2)} → {_fmt(s['s_per_edit_end'], 2)} "
            f"({_fmt(s['cpu_s_per_edit_start'], 2)} → {_fmt(s['cpu_s_per_edit_end'], 2)}) "
            f"| {s['eval_s']:.1f} s | {_fmt(s['peak_rss_gb'], 2)} GB |"
        )
    return "\n".join(lines)


MARKS = (250, 500, 750, 1000)  # the progress table's columns (edits)


def progress(log: dict[str, Any], marks: Sequence[int] = MARKS) -> dict[str, Any]:
    """Over the whole run: the median and the largest CPU seconds per edit of a batch,
    the median wall seconds, the lowest window efficacy (and where), the change of NS
    against the unedited model over the first and the last ≥ LAST edits' windows, and
    the retention at the checkpoint nearest each mark (``None`` past the run's last
    checkpoint)."""
    cpu = [b["compute_cpu_s"] / len(b["case_ids"]) for b in log["batches"] if b["case_ids"]]
    wall = [b["compute_s"] / len(b["case_ids"]) for b in log["batches"] if b["case_ids"]]
    ckpts = [c for c in log["checkpoints"] if c["efficacy"] is not None]
    worst = min(ckpts, key=lambda c: c["efficacy"], default=None)
    at: dict[int, tuple[int, float] | None] = {}
    for mark in marks:
        if not log["checkpoints"] or log["checkpoints"][-1]["edits"] < mark:
            at[mark] = None  # the run stopped before
            continue
        c = min(log["checkpoints"], key=lambda c: (abs(c["edits"] - mark), c["edits"]))
        at[mark] = (c["edits"], c["retention"])
    return {
        "cpu_s_per_edit_median": statistics.median(cpu) if cpu else None,
        "cpu_s_per_edit_max": max(cpu) if cpu else None,
        "s_per_edit_median": statistics.median(wall) if wall else None,
        "lowest_window_efficacy": (worst["edits"], worst["efficacy"]) if worst else None,
        "ns_change_first": _last_windows(log["checkpoints"], _ns_change, first=True),
        "ns_change_last": _last_windows(log["checkpoints"], _ns_change),
        "retention_at": at,
    }


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}".replace("-", "−")


def progress_table(logs: Sequence[dict[str, Any]], marks: Sequence[int] = MARKS) -> str:
    """Markdown: per run the CPU and wall seconds per edit over the whole run, the
    lowest window efficacy, NS minus the unedited NS over the first → the last 100
    edits, and retention at each mark (the checkpoint's edit count in brackets where
    it is not the mark)."""
    head = " / ".join(f"{m:,}" for m in marks)
    lines = [
        "| run | CPU s/edit, median (max batch) | wall s/edit, median "
        f"| lowest window ES (at edits) | NS − unedited, first → last {LAST} "
        f"| retention at {head} edits |",
        "|---|---|---|---|---|---|",
    ]
    for log in logs:
        p = progress(log, marks)
        cells = []
        for mark in marks:
            hit = p["retention_at"][mark]
            if hit is None:
                cells.append("–")
            else:
                edits, value = hit
                cells.append(_fmt(value, 3) + ("" if edits == mark else f" ({edits})"))
        worst = p["lowest_window_efficacy"]
        lines.append(
            f"| {log['method']} batch {log['batch_size']} "
            f"| {_fmt(p['cpu_s_per_edit_median'], 2)} ({_fmt(p['cpu_s_per_edit_max'], 2)}) "
            f"| {_fmt(p['s_per_edit_median'], 2)} "
            f"| {'–' if worst is None else f'{_fmt(worst[1], 2)} ({worst[0]})'} "
            f"| {_signed(p['ns_change_first'])} → {_signed(p['ns_change_last'])} "
            f"| {' / '.join(cells)} |"
        )
    return "\n".join(lines)


PLOTS = (
    ("efficacy", "efficacy (ES) of the last window"),
    ("paraphrase", "paraphrase (PS) of the last window"),
    ("neighborhood", "neighbourhood (NS) of the last window"),
    ("retention", "retention: earlier edits still holding"),
    ("s_per_edit", "seconds per edit (compute only, wall clock)"),
    ("cpu_s_per_edit", "CPU seconds per edit (compute only, this process)"),
    ("update_norm_max", "largest update norm in the window"),
)
_LINESTYLES = ("-", "--", ":", "-.")


def plot_logs(out_dir: Path, logs: Sequence[dict[str, Any]] | None = None) -> list[Path]:
    """One PNG per metric (one line per run) and ``drift.png`` (a panel per edited
    parameter), against the number of edits; returns the files written."""
    plt = pyplot()
    logs = list(load_logs(out_dir) if logs is None else logs)
    methods = sorted({g["method"] for g in logs})
    sizes = sorted({g["batch_size"] for g in logs})

    def style(g: dict[str, Any]) -> dict[str, Any]:
        return {
            "color": f"C{methods.index(g['method']) % 10}",
            "linestyle": _LINESTYLES[sizes.index(g["batch_size"]) % len(_LINESTYLES)],
            "marker": ".",
            "label": f"{g['method']} batch {g['batch_size']}",
        }

    written: list[Path] = []
    for key, title in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for g in logs:
            pts = [(c["edits"], c[key]) for c in g["checkpoints"] if c.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), **style(g))
        if key in ("efficacy", "paraphrase", "neighborhood"):
            # each window's records unedited, thin and dotted in the run's colour
            for g in logs:
                pts = [(c["edits"], c[f"unedited_{key}"]) for c in g["checkpoints"]
                       if c.get(f"unedited_{key}") is not None]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=style(g)["color"], linestyle=":",
                            linewidth=0.8, alpha=0.7)  # fmt: skip
            if logs:
                ax.plot([], [], color="grey", linestyle=":", label="the same records unedited")
        if key == "update_norm_max":
            ax.set_yscale("log")
        elif not key.endswith("s_per_edit"):
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("number of edits")
        ax.set_xlim(left=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / f"{key}.png", plt))
    fig = drift_figure(plt, logs, style)
    written.append(save_figure(fig, out_dir / "drift.png", plt, tight=False))
    return written


# -- command line ----------------------------------------------------------------------------


def _one(args: argparse.Namespace) -> None:
    """One run in this process (started by :func:`main`)."""
    from workers.models.loading import load_model  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(MODEL_SOURCE, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    model, tok = lm.model, lm.tokenizer
    records = load_records(args.data / "counterfact_dev.jsonl", args.n)
    info = {
        "model": MODEL_SOURCE,
        "records": str(args.data / "counterfact_dev.jsonl"),
        "command": "python bench/sequential.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_head(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_load_s": round(load_s, 1),
    }
    guard = None
    if args.observe_guard:
        guard = load_guard(args.guard_policy)
        info["guard_policy"] = args.guard_policy
    run_sequential(
        model,
        tok,
        records,
        args.one,
        args.batch_sizes[0],
        args.out,
        guard=guard,
        guard_enforce=False,
        header_extra={"guard_mode": "observe"} if guard else None,
        every=args.every,
        stats_cache=StatsCache(args.cache_dir / "stats", weights_fingerprint(model)),
        max_minutes=args.max_minutes,
        resume=args.resume,
        info=info,
        echo=lambda message: print(message, flush=True),
    )


def main(argv: Sequence[str] | None = None) -> None:
    from workers.editing.hparams import METHODS  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--n", type=int, default=1000, help="records (edits) per run")
    ap.add_argument("--every", type=int, default=25, help="edits between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sequential")
    ap.add_argument("--data", type=Path, default=DATA, help="folder of counterfact_dev.jsonl")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="model and statistics cache")
    ap.add_argument("--max-minutes", type=float, help="per run: stop at a checkpoint in time")
    ap.add_argument("--resume", action="store_true", help="continue runs from their logs")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from the logs")
    ap.add_argument("--table", action="store_true", help="print the summary table of the logs")
    ap.add_argument("--observe-guard", action="store_true",
                    help="log the guard's verdict on every delta (all are applied)")  # fmt: skip
    ap.add_argument("--guard-policy", type=json_object, default={}, help="GuardPolicy overrides")
    ap.add_argument("--guard-report", action="store_true",
                    help="print the observed guard's decisions, write guard.json")  # fmt: skip
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _one(args)
        return
    if args.guard_report:
        reports = [guard_report(g, judge=judge) for g in load_logs(args.out)
                   if any(b.get("guard") for b in g["batches"])
                   for judge in ("canary", "probe")]  # fmt: skip
        (args.out / "guard.json").write_text(json.dumps(reports, indent=1) + "\n")
        print(report_table(reports))
        return
    if args.plot_only or args.table:
        logs = load_logs(args.out)
        if not logs:
            sys.exit(f"no sequential-benchmark logs in {args.out}")
        if args.plot_only:
            for path in plot_logs(args.out, logs):
                print(f"wrote {path}")
        if args.table:
            print(table(logs))
            print()
            print(progress_table(logs))
        return
    if not (args.data / "counterfact_dev.jsonl").is_file():
        sys.exit(f"{args.data / 'counterfact_dev.jsonl'} not found (set --data)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for method in args.methods:
        for batch in args.batch_sizes:
            cmd = [sys.executable, __file__, "--one", method, "--batch-sizes", str(batch),
                   "--n", str(args.n), "--every", str(args.every), "--threads", str(args.threads),
                   "--out", str(args.out), "--data", str(args.data),
                   "--cache-dir", str(args.cache_dir)]  # fmt: skip
            if args.max_minutes is not None:
                cmd += ["--max-minutes", str(args.max_minutes)]
            if args.observe_guard:
                cmd += ["--observe-guard", "--guard-policy", json.dumps(args.guard_policy)]
            if args.resume:
                cmd.append("--resume")
            print(f"== {run_name(method, batch, args.n)}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, check=False)
            print(f"== exit {done.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
    logs = load_logs(args.out)
    for path in plot_logs(args.out, logs):
        print(f"wrote {path}")
    print(table(logs))


if __name__ == "__main__":
    main()
