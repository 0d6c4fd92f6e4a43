"""Second-moment statistics: corpora, one-pass collection, the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_model
from workers.editing.common.hooks import forward_hooks
from workers.editing.common.stats import (
    StatsCache,
    StatsError,
    compute_second_moments,
    parse_corpus,
    stats_provider,
)
from workers.editing.types import EditContext
from workers.models.profiles import profile_for

TEXTS = [
    "The Eiffel Tower is located in Paris .",
    "Mozart plays the piano and the violin .",
    "Tokyo is the capital city of Japan .",
    "Einstein was born in Germany and works in physics .",
    "The Danube river is in Vienna , Austria .",
]


def params_of(model, layers=(0, 1, 2)) -> list[str]:
    profile = profile_for(model)
    return [profile.mlp_out_param(layer) for layer in layers]


def direct_second_moment(model, tok, texts, param: str, max_tokens: int) -> torch.Tensor:
    """E[k kᵀ] the slow, obvious way: one text at a time, every position but the first."""
    module = param.removesuffix(".weight")
    total, count = None, 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
        with forward_hooks(model, record_inputs=[module]) as seen, torch.no_grad():
            model(ids)
        k = seen[f"in:{module}"][0, 1:].double()
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
    return (total / count).float()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_text_corpus_matches_direct_computation(tmp_path, tok, kind):
    model = tiny_model(kind)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS))
    params = params_of(model)
    moments, count = compute_second_moments(model, tok, params, f"file:{corpus}", 100, 8)
    assert count == sum(min(len(tok(t)["input_ids"]), 8) - 1 for t in TEXTS)
    for param in params:
        expected = direct_second_moment(model, tok, TEXTS, param, 8)
        assert moments[param].dtype == torch.float32
        assert torch.allclose(moments[param], expected, rtol=1e-5, atol=1e-6), param


def test_one_pass_equals_one_layer_at_a_time(tmp_path, tok):
    model = tiny_model("gpt_neox")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    params = params_of(model)
    together, _ = compute_second_moments(model, tok, params, f"file:{corpus}", 100, 16)
    for param in params:
        alone, _ = compute_second_moments(model, tok, [param], f"file:{corpus}", 100, 16)
        assert torch.equal(alone[param], together[param])


def test_self_sampled_is_seeded_and_a_second_moment(tok):
    model = tiny_model("gptj")
    params = params_of(model, (1, 2))
    a, count = compute_second_moments(model, tok, params, "self", 10, 12, seed=3)
    b, _ = compute_second_moments(model, tok, params, "self", 10, 12, seed=3)
    c, _ = compute_second_moments(model, tok, params, "self", 10, 12, seed=4)
    assert count == 10 * 11  # every position but the start token
    for p in params:
        assert torch.equal(a[p], b[p])
        assert not torch.equal(a[p], c[p])
        assert torch.allclose(a[p], a[p].T)
        assert float(torch.linalg.eigvalsh(a[p].double()).min()) > -1e-6


def test_hf_dataset_from_a_local_folder(tmp_path, tok):
    """The ``datasets`` code path, offline: a folder holding one JSON-lines file."""
    folder = tmp_path / "mini_ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    model = tiny_model("llama")
    params = params_of(model, (1,))
    from_hf, _ = compute_second_moments(model, tok, params, f"hf:{folder}", 100, 8)
    from_file, _ = compute_second_moments(
        model, tok, params, f"file:{folder / 'train.jsonl'}", 100, 8
    )
    assert torch.allclose(from_hf[params[0]], from_file[params[0]], rtol=1e-6, atol=1e-7)


def test_cache_second_call_loads_from_disk(tmp_path, tok):
    model = tiny_model("gpt2")
    params = params_of(model)
    progress: list[float] = []
    first = StatsCache(tmp_path, "tiny-gpt2").get_or_compute(
        model, tok, params, "self", 8, 10, progress=lambda f, _m: progress.append(f)
    )
    assert progress and progress[-1] == 1.0
    files = sorted(p.name for p in (tmp_path / "tiny-gpt2").iterdir())
    assert len(files) == 3 and all(f.endswith("__self__n8_t10_s0.safetensors") for f in files)
    # a new cache object (a restarted worker) must read the files: it gets no model
    second = StatsCache(tmp_path, "tiny-gpt2").get_or_compute(None, tok, params, "self", 8, 10)
    for p in params:
        assert torch.equal(first[p], second[p])
    # another sample count is another entry
    other = StatsCache(tmp_path, "tiny-gpt2").get_or_compute(model, tok, params[:1], "self", 4, 10)
    assert not torch.equal(other[params[0]], first[params[0]])


def test_stats_provider_computes_all_layers_once(tmp_path, tok):
    model = tiny_model("llama")
    params = params_of(model)
    cache = StatsCache(tmp_path, "tiny-llama")
    ctx = EditContext(stats_provider=stats_provider(cache, model, tok, params, "self", 6, 8))
    c1 = ctx.second_moment(params[1])
    assert c1.shape == (64, 64)
    assert len(list((tmp_path / "tiny-llama").iterdir())) == 3  # all layers in one pass
    assert torch.equal(ctx.second_moment(params[1]), c1)


def test_corpus_specs():
    assert parse_corpus("self").kind == "self"
    spec = parse_corpus("hf:wikitext:wikitext-103-raw-v1:train")
    assert (spec.kind, spec.location, spec.config, spec.split) == (
        "hf", "wikitext", "wikitext-103-raw-v1", "train",
    )  # fmt: skip
    assert parse_corpus("hf:wikitext").split == "train"
    assert parse_corpus("file:/data/texts").location == "/data/texts"
    assert parse_corpus("file:/a").slug != parse_corpus("file:/b").slug
    for bad in ("wiki", "hf:", "file:", "hf:a:b:c:d"):
        with pytest.raises(StatsError):
            parse_corpus(bad)
    with pytest.raises(StatsError, match="filename-safe"):
        StatsCache(Path("/tmp"), "../escape")


def test_missing_corpus_path_is_an_error(tok):
    model = tiny_model("llama")
    with pytest.raises(StatsError, match="not found"):
        compute_second_moments(model, tok, params_of(model), "file:/nonexistent/x", 4, 8)
