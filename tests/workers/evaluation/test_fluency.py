"""The fluency suite and the canary on tiny random models: perplexity equals a direct
per-text computation, n-gram entropy matches hand-computed values, the suite is
deterministic and leaves the model as it was."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import tiny_model, word_tokenizer
from workers.evaluation import canary, fluency
from workers.evaluation.scoring import target_logprobs
from workers.runtime import tensor_sha256

TEXTS = [
    "Mozart was born in Vienna .",
    "The Eiffel Tower is located in Paris and the Colosseum is in Rome .",
    "Picasso",  # one token: predicts nothing
    "Marie Curie works in physics , she lives in Paris .",
    "The river in London is the Thames",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def direct_nll(model, tok, text: str) -> tuple[float, int]:
    """Σ NLL and token count of one text, alone, unpadded, by the model's own loss."""
    ids = torch.tensor([tok(text)["input_ids"]])
    if ids.shape[1] < 2:
        return 0.0, 0
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # mean over the predicted tokens
    n = ids.shape[1] - 1
    return float(loss) * n, n


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_equals_a_direct_per_text_computation(kind, batch_size, tok) -> None:
    model = tiny_model(kind, seed=1)
    pairs = fluency.token_nll(model, tok, TEXTS, batch_size=batch_size)
    direct = [direct_nll(model, tok, t) for t in TEXTS]
    assert [n for _, n in pairs] == [n for _, n in direct]
    assert pairs[2] == (0.0, 0)
    for (nll, _), (want, _) in zip(pairs, direct, strict=True):
        assert nll == pytest.approx(want, rel=1e-5, abs=1e-5)
    # token-weighted: exp(Σ NLL / Σ tokens), not the mean of per-text perplexities
    total = sum(n for _, n in direct)
    expected = math.exp(sum(x for x, _ in direct) / total)
    ppl = fluency.perplexity(model, tok, TEXTS, batch_size=batch_size)
    assert ppl == pytest.approx(expected, rel=1e-5)
    per_text = [math.exp(x / n) for x, n in direct if n]
    assert abs(ppl - sum(per_text) / len(per_text)) > 1e-3 * ppl


def test_perplexity_truncates_to_the_context_and_refuses_nothing_to_score(tok) -> None:
    model = tiny_model("gpt2", seed=1)  # 64 positions
    long_text = " ".join(["Paris"] * 100)
    ((_, n),) = fluency.token_nll(model, tok, [long_text])
    assert n == 63
    ((_, n8),) = fluency.token_nll(model, tok, [long_text], max_length=8)
    assert n8 == 7
    with pytest.raises(ValueError, match="nothing to score"):
        fluency.perplexity(model, tok, ["Picasso"])


def test_ngram_entropy_by_hand() -> None:
    # "a b a b a b": 2-grams ab×3, ba×2 → H2 = H(.6, .4); 3-grams aba×2, bab×2 → H3 = 1
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert fluency.text_ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3) / 2)
    # all n-grams distinct: H_n = log2(count)
    six = "one two three four five six"
    assert fluency.text_ngram_entropy(six) == pytest.approx(
        (2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2
    )
    # punctuation marks are words; too short for any 2-gram: 0
    assert fluency.words("Paris, France.") == ["Paris", ",", "France", "."]
    assert fluency.text_ngram_entropy("Paris") == 0.0
    # a repetitive text scores lower than a varied one; the mean over texts
    babble = "CBS CBS CBS CBS CBS CBS CBS CBS"
    assert fluency.text_ngram_entropy(babble) == 0.0
    assert fluency.ngram_entropy([babble, six]) == pytest.approx(
        fluency.text_ngram_entropy(six) / 2
    )
    with pytest.raises(ValueError):
        fluency.ngram_entropy([])


def test_fixed_data_ships_with_the_package() -> None:
    texts, prompts = fluency.fixed_texts(), fluency.fixed_prompts()
    assert 30 <= len(texts) <= 40 and len(set(texts)) == len(texts)
    assert len(prompts) >= 10 and len(set(prompts)) == len(prompts)
    assert canary.canary_texts(8) == list(texts[:8])
    with pytest.raises(ValueError):
        canary.canary_texts(len(texts) + 1)


def test_suite_is_deterministic_and_leaves_the_model_unchanged(tok) -> None:
    model = tiny_model("llama", seed=2)
    model.train()
    hashes = {n: tensor_sha256(p) for n, p in model.named_parameters()}
    seen: list[float] = []
    out = fluency.run_suite(model, tok, {"max_new_tokens": 6}, progress=lambda f, m: seen.append(f))
    assert set(out["metrics"]) == {"ngram_entropy", "perplexity"}
    assert out["metrics"]["perplexity"] == pytest.approx(
        fluency.perplexity(model, tok, fluency.fixed_texts()), rel=1e-6
    )
    gens = out["details"]["generations"]
    assert [g["prompt"] for g in gens] == list(fluency.fixed_prompts())
    assert out["metrics"]["ngram_entropy"] == pytest.approx(
        fluency.ngram_entropy([g["text"] for g in gens])
    )
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert model.training  # put back
    assert {n: tensor_sha256(p) for n, p in model.named_parameters()} == hashes
    again = fluency.run_suite(model, tok, {"max_new_tokens": 6, "ignored": 1})
    assert again == out
    custom = fluency.run_suite(model, tok, {"prompts": ["Mozart was born in"]})
    assert [g["prompt"] for g in custom["details"]["generations"]] == ["Mozart was born in"]
    assert custom["details"]["max_new_tokens"] == fluency.DEFAULT_MAX_NEW_TOKENS


@pytest.mark.parametrize(
    "params",
    [{"max_new_tokens": 0}, {"max_new_tokens": "5"}, {"max_new_tokens": True},
     {"prompts": []}, {"prompts": "Paris"}, {"prompts": ["", "x"]}],
)  # fmt: skip
def test_suite_rejects_bad_params(params, tok) -> None:
    with pytest.raises(ValueError):
        fluency.run_suite(tiny_model("gpt2", seed=0), tok, params)


def test_canary_matches_direct_computations(tok) -> None:
    model = tiny_model("llama", seed=3)
    texts = canary.canary_texts(8)
    cases = [
        canary.RecallCase(11, "Mozart was born in", "Paris", "Vienna"),
        canary.RecallCase(12, "The Eiffel Tower is located in", "Rome", "Paris"),
        canary.RecallCase(13, "Picasso speaks", "French", "Spanish"),
    ]
    m = canary.measure(model, tok, texts, cases)
    direct = [direct_nll(model, tok, t) for t in texts]
    assert m.tokens == sum(n for _, n in direct)
    assert m.perplexity == pytest.approx(math.exp(sum(x for x, _ in direct) / m.tokens), rel=1e-5)
    new = target_logprobs(model, tok, [c.prompt for c in cases], [c.target_new for c in cases])
    true = target_logprobs(model, tok, [c.prompt for c in cases], [c.target_true for c in cases])
    assert m.recall == {c.key: a > b for c, a, b in zip(cases, new, true, strict=True)}
    assert len(set(m.recall.values())) == 2  # this seed gives both outcomes: a real check
    assert canary.measure_recall(model, tok, []) == {}
