"""Which records make the original ROME blow up, found without editing (issue 4).

    python bench/rome_denominators.py --n 5000 --top 40 \\
        --out bench/results/forgetting/rome_denominators.json

``rome_original`` and r-ROME (``rome``) make the same rank-one update up to a scalar
(``workers/editing/rome.py``): the original divides by k₀ᵀC⁻¹k* where r-ROME divides
by k*ᵀC⁻¹k* (k*: the key at the subject averaged over the context templates, k₀: the
bare prompt's key, C: the key statistics). So

    ‖ΔW_original‖ / ‖ΔW_r-ROME‖ = |k*ᵀC⁻¹k* / k₀ᵀC⁻¹k*|  (the "blow-up")

needs only the keys, one forward pass to the edited layer per template, and no v*
optimisation. A blow-up of 10 or more, or a negative denominator (the update then
points against the target), marks a candidate disabling edit (Gupta et al. 2024,
"Rebuilding ROME", §4, trace the disabling edits to this denominator). This scans
the first ``--n`` records of ``counterfact_disabling.jsonl`` with SmolLM2 and
``rome_original``'s defaults, prints the distribution, and writes every record's
numbers with the ``--top`` largest blow-ups first.

``--sequence-out FILE`` writes a list of case_ids for ``bench/forgetting.py
--case-ids``: every candidate (blow-up of at least ``--min-blow-up``, in file order),
each after ``--ordinary`` records whose blow-up is below 2 — a sequence of mostly
ordinary edits with the disabling candidates spread through it, on which the guard's
catch rate is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

from bench._editrun import CACHE, DATA, MODEL_SOURCE, git_head, load_records, request_of  # noqa: E402
from workers.editing.common.base import second_moment_or_identity  # noqa: E402
from workers.editing.common.keys import read_keys  # noqa: E402
from workers.editing.common.stats import StatsCache, stats_provider  # noqa: E402
from workers.editing.common.templates import context_templates  # noqa: E402
from workers.editing.hparams import defaults_for  # noqa: E402
from workers.editing.types import EditContext  # noqa: E402
from workers.models.loading import weights_fingerprint  # noqa: E402
from workers.models.profiles import profile_for  # noqa: E402

RECORDS_FILE = "counterfact_disabling.jsonl"


def blow_ups(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict[str, Any]],
    hp: Any,
    ctx: EditContext,
    *,
    chunk: int = 64,
) -> list[dict[str, Any]]:
    """Per record: both denominators and their ratio (module docstring)."""
    profile = profile_for(model)
    layer = hp.layers[0]
    module, param = profile.mlp_out_module(layer), profile.mlp_out_param(layer)
    weight = model.get_parameter(param)
    d_in = profile.d_in(weight.shape)
    c = second_moment_or_identity(ctx, param, d_in, hp.mom2_adjustment)
    templates = context_templates(model, tok, hp.context_template_length_params, ctx)
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            reqs = [request_of(r) for r in part]
            k_star = read_keys(model, tok, reqs, templates, module=module,
                               fact_token=hp.fact_token).keys.to(torch.float64).cpu()  # fmt: skip
            k_bare = read_keys(model, tok, reqs, ["{}"], module=module,
                               fact_token=hp.fact_token).keys.to(torch.float64).cpu()  # fmt: skip
            u = torch.linalg.solve(c, k_star.T).T  # C⁻¹k* per row
            averaged = (k_star * u).sum(-1)
            bare = (k_bare * u).sum(-1)
            for rec, a, b in zip(part, averaged.tolist(), bare.tolist(), strict=True):
                out.append({
                    "case_id": rec["case_id"], "averaged_denominator": a, "bare_denominator": b,
                    "blow_up": a / b if b != 0 else float("inf"),
                })  # fmt: skip
    return out


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    size = sorted(abs(r["blow_up"]) for r in rows)

    def q(p: float) -> float:
        return size[min(len(size) - 1, int(p * len(size)))]

    return {
        "records": len(rows),
        "negative": sum(r["blow_up"] < 0 for r in rows),
        "at_least_2": sum(s >= 2 for s in size),
        "at_least_5": sum(s >= 5 for s in size),
        "at_least_10": sum(s >= 10 for s in size),
        "median": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": size[-1],
    }


def sequence(rows: Sequence[dict[str, Any]], min_blow_up: float, ordinary: int) -> list[int]:
    """Case ids: each candidate after ``ordinary`` unused records with |blow-up| < 2."""
    plain = [r["case_id"] for r in rows if abs(r["blow_up"]) < 2]
    out: list[int] = []
    for r in rows:
        if abs(r["blow_up"]) >= min_blow_up:
            out += plain[:ordinary] + [r["case_id"]]
            plain = plain[ordinary:]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from workers.models.loading import load_model  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="records scanned, from the first")
    ap.add_argument("--top", type=int, default=40, help="largest blow-ups listed first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequence-out", type=Path, help="write a case_id sequence (docstring)")
    ap.add_argument("--min-blow-up", type=float, default=10.0)
    ap.add_argument("--ordinary", type=int, default=2, help="ordinary records per candidate")
    ap.add_argument("--data", type=Path, default=DATA, help=f"folder of {RECORDS_FILE}")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "forgetting"
                    / "rome_denominators.json")  # fmt: skip
    args = ap.parse_args(argv)
    if not (args.data / RECORDS_FILE).is_file():
        sys.exit(f"{args.data / RECORDS_FILE} not found (set --data)")
    torch.set_num_threads(args.threads)
    lm = load_model(MODEL_SOURCE, cache_dir=args.cache_dir)
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    profile = profile_for(model)
    w = model.get_parameter(profile.mlp_out_param(0))
    hp = defaults_for("rome_original", cfg.model_type, cfg.num_hidden_layers,
                      int(w.shape[0] if profile.transposed else w.shape[1]))  # fmt: skip
    cache = StatsCache(args.cache_dir / "stats", weights_fingerprint(model))
    provider = stats_provider(cache, model, tok, [profile.mlp_out_param(hp.layers[0])],
                              hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens)  # fmt: skip
    ctx = EditContext(stats_provider=provider, cache={})
    records = load_records(args.data / RECORDS_FILE, args.n)
    t0 = time.perf_counter()
    rows = blow_ups(model, tok, records, hp, ctx)
    seconds = time.perf_counter() - t0
    ranked = sorted(rows, key=lambda r: -abs(r["blow_up"]))
    top = ranked[: args.top]
    s = summary(rows)
    result = {
        "summary": s,
        "top": top,
        "records": rows,
        "info": {
            "model": MODEL_SOURCE, "records": str(args.data / RECORDS_FILE),
            "layer": hp.layers[0], "templates": hp.context_template_length_params,
            "command": "python bench/rome_denominators.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads, "torch": torch.__version__, "git": git_head(),
            "seconds": round(seconds, 1),
        },
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{s['records']} records in {seconds:.0f} s: |blow-up| median {s['median']:.2f}, "
          f"p90 {s['p90']:.2f}, p99 {s['p99']:.2f}, max {s['max']:.1f}; "
          f"≥2: {s['at_least_2']}, ≥5: {s['at_least_5']}, ≥10: {s['at_least_10']}, "
          f"negative denominators: {s['negative']}")  # fmt: skip
    print("| case_id | k*ᵀC⁻¹k* | k₀ᵀC⁻¹k* | blow-up |\n|---|---|---|---|")
    for r in top[:15]:
        print(f"| {r['case_id']} | {r['averaged_denominator']:.4g} "
              f"| {r['bare_denominator']:.4g} | {r['blow_up']:.1f} |")  # fmt: skip
    print(f"written to {args.out}")
    if args.sequence_out:
        ids = sequence(rows, args.min_blow_up, args.ordinary)
        args.sequence_out.write_text(json.dumps(ids) + "\n")
        print(f"{len(ids)} case ids ({len(ids) // (args.ordinary + 1)} candidates) written "
              f"to {args.sequence_out}")  # fmt: skip


if __name__ == "__main__":
    main()
