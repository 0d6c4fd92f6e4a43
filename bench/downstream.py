"""Downstream scores of the unedited SmolLM2 (issue 4): the ``downstream`` suite
(workers/evaluation/downstream.py, lm-eval with the in-memory model) on the task files
of ../shared/data/downstream, as a markdown table and a JSON file.

    python bench/downstream.py --threads 1                    # the suite's default sample
    python bench/downstream.py --limit 0 --threads 1          # every test example (hours)
    python bench/downstream.py --tasks sst2 mmlu --shots 0 --out bench/results/downstream-0shot.json

Columns: task, test examples scored, shots (demonstrations asked; fewer when the
context budget cut them), the task's headline metric (weighted F1, or accuracy for
the four-way tasks) and its value, and the seconds the task took. The JSON holds the
same per task plus accuracy, F1 and lm-eval's Brier score, how often each label was predicted (a model stuck on
one label scores the majority share), the label words' token counts, and the run's
setup (command, machine, thread count, git commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

from bench._editrun import CACHE, DATA, MODEL_SOURCE, git_head  # noqa: E402
from workers.evaluation.downstream import run_suite  # noqa: E402
from workers.evaluation.downstream_tasks import (  # noqa: E402
    DEFAULT_SHOTS,
    DEFAULT_TASKS,
    LOCAL_TASKS,
)


def score(
    model: torch.nn.Module,
    tok: Any,
    tasks: Sequence[str],
    shots: int,
    limit: int | None,
    data_dir: Path,
    echo: Any = None,
) -> dict[str, Any]:
    """The suite's result reshaped per task (without per-example rows)."""
    params: dict[str, Any] = {"tasks": list(tasks), "shots": shots, "data_dir": str(data_dir)}
    if limit is not None:
        params["limit"] = limit or "all"
    progress = None if echo is None else (lambda f, m: echo(f"{f:4.0%} {m}"))
    start = time.perf_counter()
    result = run_suite(model, tok, params, progress=progress)
    per_task: dict[str, Any] = {}
    for name, d in result["details"].items():
        if name not in LOCAL_TASKS:
            per_task[name] = {"seconds": d["seconds"], "lm_eval_results": d["lm_eval_results"]}
            continue
        preds = Counter(e["pred"] for e in d["predictions"])
        golds = Counter(e["gold"] for e in d["predictions"])
        choices = d["choices"]
        per_task[name] = {
            "examples": d["examples"],
            "shots": d["shots"],
            "demos_min": d["demos_min"],
            "metric": d["headline"],
            "score": d[d["headline"]],
            "acc": d["acc"],
            "f1": d["f1"],
            "brier": d["brier"],
            "seconds": d["seconds"],
            "predicted": {choices[i]: preds.get(i, 0) for i in range(len(choices))},
            "gold": {choices[i]: golds.get(i, 0) for i in range(len(choices))},
            "label_tokens": d["label_tokens"],
            "longest_input_tokens": d["longest_input_tokens"],
        }
    return {
        "metrics": result["metrics"],
        "tasks": per_task,
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(res: dict[str, Any]) -> str:
    """The markdown table of a :func:`score` result (and its macro average)."""
    lines = [
        "| task | examples | shots | metric | score | seconds |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, t in res["tasks"].items():
        if "metric" not in t:
            for key, value in sorted(res["metrics"].items()):
                if key.startswith(f"{name}_"):
                    lines.append(
                        f"| {name} | | | {key[len(name) + 1 :]} | {value:.3f} | {t['seconds']:.1f} |"
                    )
            continue
        shots = str(t["shots"]) + (
            f" (≥{t['demos_min']} fit)" if t["demos_min"] < t["shots"] else ""
        )
        metric = "weighted F1" if t["metric"] == "f1" else "accuracy"
        lines.append(
            f"| {name} | {t['examples']} | {shots} | {metric} | {t['score']:.3f} | {t['seconds']:.1f} |"
        )
    if "macro_f1" in res["metrics"]:
        lines.append(
            f"| **macro** | | | mean weighted F1 | {res['metrics']['macro_f1']:.3f} | {res['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--shots", type=int, default=DEFAULT_SHOTS)
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="test examples per task (default: the suite's default sample; 0: all of them)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--data", type=Path, default=DATA / "downstream", help="folder of <task>.jsonl")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "downstream.json")
    args = ap.parse_args(argv)

    from workers.models.loading import load_model  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(MODEL_SOURCE, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    res = score(
        lm.model, lm.tokenizer, args.tasks, args.shots, args.limit, args.data,
        echo=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    res["info"] = {
        "model": MODEL_SOURCE,
        "data": str(args.data),
        "command": "python bench/downstream.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git": git_head(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_load_s": round(load_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
