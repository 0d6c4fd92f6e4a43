"""Reverting one edit at a time after many (issue 15), with the closed-form
mechanism of ``workers/editing/revert.py`` (not wired into the service yet: this
measures it). SmolLM2, the edit pipeline with no ledger (as ``bench/sequential.py``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/revert.py --n 200 --reverts 20 \\
        --out bench/results/revert_alphaedit_smollm2.json

``--n`` CounterFact dev records are edited in order with ``--method`` (AlphaEdit) in
batches of ``--batch``; then ``--reverts`` of them, evenly spread over the history
(every n/reverts-th), are reverted one at a time, each revert one more update of the
runtime. For the edit X of version v, at each layer of the method's window, the
update removes D = W − W_before(v) but at the keys of every other edit (the active
ones and those reverted before: they stay as they are at their keys). Measured on the
fact's prompt (log p(new) against log p(true)):

- reverted: of the reverted facts the unedited model preferred the true target on,
  the share where it does again (≥ 0.95 asked);
- kept: of the facts the other edits held before the reverts, the share still held
  (≥ 0.98 asked);
- NS: the CounterFact neighbourhood score over all records, before and after the
  reverts (no worse asked); ES and PS of the kept edits beside it;
- seconds (wall and CPU) per revert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: ``bench`` is a folder of the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._editrun import (  # noqa: E402
    CACHE,
    DATA,
    MODEL_SOURCE,
    git_head,
    load_records,
    plan_batches,
    request_of,
    score_records,
)
from workers import pipeline  # noqa: E402
from workers.editing.common.stats import StatsCache, stats_provider  # noqa: E402
from workers.editing.common.templates import context_templates  # noqa: E402
from workers.editing.hparams import defaults_for  # noqa: E402
from workers.editing.registry import get_editor  # noqa: E402
from workers.editing.revert import revert_updates  # noqa: E402
from workers.editing.types import EditContext, WeightDelta  # noqa: E402
from workers.models.loading import load_model, weights_fingerprint  # noqa: E402
from workers.models.profiles import d_mlp, profile_for  # noqa: E402
from workers.runtime import ModelRuntime  # noqa: E402


def mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reverts", type=int, default=20)
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t_start = time.time()
    lm = load_model(MODEL_SOURCE, cache_dir=CACHE)
    model, tok = lm.model, lm.tokenizer
    records = load_records(DATA / "counterfact_dev.jsonl", args.n)
    cfg = model.config
    hp = defaults_for(args.method, cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
    profile = profile_for(model)
    params = [profile.mlp_out_param(layer) for layer in hp.layers]
    editor = get_editor(args.method)
    stats = StatsCache(CACHE / "stats", weights_fingerprint(model))
    provider = stats_provider(stats, model, tok, params, hp.mom2_dataset, hp.mom2_n_samples,
                              hp.mom2_sample_tokens)  # fmt: skip
    runtime = ModelRuntime(model, tok)
    cache: dict[str, Any] = {}

    def context() -> EditContext:
        return EditContext(stats_provider=provider, cache=cache, state=runtime.method_state())

    unedited = score_records(model, tok, records, full=True)
    # the edits, one version per batch; the weights of the window before each
    before: dict[int, dict[str, torch.Tensor]] = {}
    version_of: dict[int, int] = {}
    edit_s = edit_cpu = 0.0
    for v, batch in enumerate(plan_batches(records, args.batch), start=1):
        before[v] = {p: runtime.param(p).detach().clone() for p in params}
        t0, c0 = time.perf_counter(), time.process_time()
        outcome = pipeline.apply_update(runtime, editor, hp, [request_of(r) for r in batch], context())  # fmt: skip
        edit_s += time.perf_counter() - t0
        edit_cpu += time.process_time() - c0
        if outcome.number is None and not outcome.accepted:
            raise RuntimeError(f"batch {v} was not applied")
        for r in batch:
            version_of[r["case_id"]] = v
        print(f"version {v}: {len(batch)} edits ({time.perf_counter() - t0:.0f} s)", flush=True)
    edited = score_records(model, tok, records, full=True)
    step = max(1, args.n // args.reverts)
    reverted = [r["case_id"] for r in records[::step][: args.reverts]]
    templates = context_templates(model, tok, hp.context_template_length_params, context())
    ctx = context()
    revert_s: list[float] = []
    revert_cpu: list[float] = []
    for k, case in enumerate(reverted, start=1):
        v = version_of[case]
        keep = [request_of(r) for r in records if r["case_id"] != case]
        t0, c0 = time.perf_counter(), time.process_time()
        updates = revert_updates(
            model, tok, keep, hp.layers, templates=templates, fact_token=hp.fact_token,
            statistics=lambda p, d: ctx.second_moment(p),
            change=lambda p, v=v: runtime.param(p).detach().float() - before[v][p].float(),
        )  # fmt: skip
        staged = runtime.stage(WeightDelta(method="revert", updates=list(updates)))
        runtime.commit(staged, (runtime.current_version or 0) + 1)
        revert_s.append(time.perf_counter() - t0)
        revert_cpu.append(time.process_time() - c0)
        print(f"revert {k}/{len(reverted)}: case {case} of version {v} ({revert_s[-1]:.1f} s)", flush=True)  # fmt: skip
    after = score_records(model, tok, records, full=True)

    rset = set(reverted)
    # reverted: the true target wins again, where the unedited model preferred it
    eligible = [c for c in reverted if (unedited[c]["margin"] or 0) < 0]
    back = [c for c in eligible if (after[c]["margin"] or 0) < 0]
    kept_cases = [r["case_id"] for r in records if r["case_id"] not in rset]
    held_before = [c for c in kept_cases if (edited[c]["margin"] or 0) > 0]
    still = [c for c in held_before if (after[c]["margin"] or 0) > 0]
    ns = {name: mean([s[r["case_id"]]["neighborhood"] for r in records])
          for name, s in (("unedited", unedited), ("edited", edited), ("after_reverts", after))}  # fmt: skip
    kept_scores = {
        name: {key: mean([s[c][key] for c in kept_cases]) for key in ("efficacy", "paraphrase")}
        for name, s in (("edited", edited), ("after_reverts", after))
    }
    result = {
        "command": " ".join(sys.argv), "git_head": git_head(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
        "records": args.n, "method": args.method, "batch": args.batch,
        "edit_s": round(edit_s, 1), "edit_cpu_s": round(edit_cpu, 1),
        "reverted_cases": reverted,
        "reverted_true_wins_again": len(back) / max(len(eligible), 1),
        "reverted_eligible": len(eligible),
        "kept_still_held": len(still) / max(len(held_before), 1),
        "kept_held_before": len(held_before),
        "ns": ns, "kept_scores": kept_scores,
        "revert_s_mean": sum(revert_s) / len(revert_s), "revert_cpu_s_mean": sum(revert_cpu) / len(revert_cpu),  # fmt: skip
        "revert_s": [round(x, 2) for x in revert_s],
        "margins": {str(c): {"unedited": unedited[c]["margin"], "edited": edited[c]["margin"],
                             "after": after[c]["margin"]} for c in reverted},  # fmt: skip
    }  # fmt: skip
    checks = {
        "reverted: the true target wins again on ≥ 0.95": result["reverted_true_wins_again"]
        >= 0.95,
        "kept: ≥ 0.98 of what they held": result["kept_still_held"] >= 0.98,
        "NS no worse than before the reverts": (ns["after_reverts"] or 0) >= (ns["edited"] or 0),
    }
    result["checks"] = checks
    print(f"\n| revert one at a time: {args.n} {args.method} edits (batches of {args.batch}), {len(reverted)} reverted | |")  # fmt: skip
    print("|---|---|")
    print(f"| reverted facts where the true target wins again (of {len(eligible)} the unedited model got right) | {result['reverted_true_wins_again']:.2f} |")  # fmt: skip
    print(f"| kept facts still held (of {len(held_before)} held before) | {result['kept_still_held']:.3f} |")  # fmt: skip
    print(f"| NS unedited / edited / after the reverts | {ns['unedited']:.3f} / {ns['edited']:.3f} / {ns['after_reverts']:.3f} |")  # fmt: skip
    ke, ka = kept_scores["edited"], kept_scores["after_reverts"]
    print(f"| kept edits' ES / PS, before / after the reverts | {ke['efficacy']:.3f} / {ke['paraphrase']:.3f} → {ka['efficacy']:.3f} / {ka['paraphrase']:.3f} |")  # fmt: skip
    print(f"| seconds per revert, wall / CPU | {result['revert_s_mean']:.1f} / {result['revert_cpu_s_mean']:.1f} |")  # fmt: skip
    print(f"| the {args.n} edits, wall / CPU | {edit_s:.0f} / {edit_cpu:.0f} s |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
