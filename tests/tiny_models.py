"""Tiny random-initialised causal LMs and a word-level tokenizer, for editor and runtime tests.

Every model builds from its config in milliseconds (4 layers, width 32, vocabulary
128) and shares the word-level tokenizer :func:`word_tokenizer`, a
``PreTrainedTokenizerFast`` built in code (no download): words split on whitespace and
punctuation, so ``" " + target`` is one token and prompt ids followed by target ids
equal the ids of the joined text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.hparams import MethodHParams, defaults_for, with_overrides
from workers.editing.types import EditContext, EditRequest
from workers.models.profiles import profile_for

VOCAB_SIZE = 128
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

# 3 special tokens + 125 words and punctuation marks = 128 ids
_WORD_LIST = """
    . , ? the a an of in on at to is was are be by with from for and or not it that this
    city country capital language speaks speak located born lives works plays play team
    river mountain tower bridge museum company founded president king queen writer actor
    music piano guitar violin football tennis chess French English German Italian Spanish
    Japanese Russian Paris Rome Berlin London Madrid Tokyo Moscow Vienna Lisbon Athens
    Eiffel Colosseum Danube Alps Thames Toyota Nokia Apple Mozart Picasso Einstein Curie
    Newton Darwin Tolstoy Homer Dante Tower Ada Alan John Mary Marie
    Peter Anna He She They We You I The In Because Therefore official mother tongue
    native home job field known famous made sells car phone computer physics painting
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :data:`WORDS` (unknown words → ``<unk>``)."""
    vocab = {tok: i for i, tok in enumerate((PAD, EOS, UNK, *WORDS))}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"tiny vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=EOS
    )


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over ASCII that fits the tiny vocabulary: id i
    is ``chr(i)`` for 3 ≤ i < 128 (ids 0–2 are pad, eos, unk), so any English text —
    label words, prompts with newlines — tokenizes, every word is several tokens, and
    decoding gives the text back. With ``bos`` it puts ``<eos>`` (the tiny models' BOS)
    before every text it encodes with special tokens, as LLaMA's tokenizer does."""
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{chr(i): i for i in range(3, VOCAB_SIZE)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", special_tokens=[(EOS, 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=EOS
    )


TINY_KINDS: tuple[str, ...] = ("gpt2", "gptj", "llama", "gpt_neox")

# A larger initialisation than the default 0.02: with it a random model's logits are
# nearly uniform and bounded (the final norm fixes the hidden state's scale), so no
# edit could make one token the most likely by a clear margin.
_IDS = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0, initializer_range=0.3)


def tiny_config(kind: str):
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=4, n_head=4, **_IDS
        )
    if kind == "gptj":
        return GPTJConfig(
            vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=4, n_head=4, rotary_dim=4,
            **_IDS,
        )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_IDS,
        )  # fmt: skip
    if kind == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=64, **_IDS,
        )  # fmt: skip
    raise ValueError(f"unknown tiny model kind {kind!r}; known: {TINY_KINDS}")


def tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A random-initialised model of ``kind`` in eval mode with gradients off, like
    :func:`workers.models.loading.load_model` returns."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    model.requires_grad_(False)
    model.eval()
    return model


def save_tiny(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    """The tiny model of ``kind`` and the word tokenizer saved as a local model folder
    (loaded with ``from_pretrained`` as a hub id would be)."""
    tiny_model(kind, seed=seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to check bit-identity later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names whose values (bitwise, NaN-aware) or dtypes differ from ``before``."""
    now = model.state_dict()
    out = []
    for k, v in before.items():
        w = now[k]
        if w.dtype != v.dtype or w.shape != v.shape or not torch.equal(w.view(-1), v.view(-1)):
            out.append(k)
    return out


# hparams overrides per method for 4-layer width-32 random models: their hidden
# vectors are small, so
# ROME's weight decay ‖δ‖/‖v₀‖² and the 4·‖v₀‖ clamp (tuned on real models) would
# pin δ near zero; λ is scaled to their 64–128 wide MLPs
TINY_OVERRIDES = {
    "rome": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0, "v_prob_threshold": 0.6,
             "context_template_length_params": [[5, 3]], "v_num_grad_steps": 40},
    "memit": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0, "v_prob_threshold": 0.6,
              "context_template_length_params": [[5, 3]], "v_num_grad_steps": 40,
              "mom2_update_weight": 1.0, "layers": [0, 1, 2]},
    # GRACE needs no change of its SmolLM2 defaults on these models but more steps:
    # its default layer is their last (3 of 4), where one value vector moves the
    # output less than deep inside a real model
    "grace": {"n_iter": 100},
    # fine-tuning: the tiny weights are ~N(0, 0.3), so Adam steps of 5e-4 (and FT-C's
    # ε, tuned on SmolLM2) barely move them; FT-C's ε still binds here (test_ft.py)
    "ft_l": {"lr": 0.05, "num_steps": 60, "stop_prob": 0.6},
    "ft_c": {"lr": 0.05, "num_steps": 60, "stop_prob": 0.6, "norm_constraint": 0.3},
    "emmet": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0, "v_prob_threshold": 0.6,
              "context_template_length_params": [[5, 3]], "v_num_grad_steps": 40,
              "mom2_update_weight": 1.0, "layers": [0, 1, 2]},
    # the tiny models' key statistics have eigenvalues ~0.01–100 (median 0.1–2): a
    # threshold of 2 leaves a null space of half (LLaMA) to 90 % (GPT-2) of the
    # dimensions; 1 leaves LLaMA 13–21 of 64, too few for three edits
    "alphaedit": {"v_weight_decay": 0.0, "clamp_norm_factor": 100.0, "v_prob_threshold": 0.6,
                  "context_template_length_params": [[5, 3]], "v_num_grad_steps": 40,
                  "nullspace_threshold": 2.0, "l2": 0.1, "layers": [0, 1, 2]},
}  # fmt: skip
# the original ROME formulation shares ROME's knobs
TINY_OVERRIDES["rome_original"] = TINY_OVERRIDES["rome"]


# three edits the tiny models' word tokenizer knows every word of (subjects distinct;
# the third's target_new is another request's subject)
REQUESTS = [
    EditRequest("The native language of {}", "Picasso", "Russian", "Spanish"),
    EditRequest("The capital city of {}", "Toyota", "Athens", "Tokyo"),
    EditRequest("The famous writer {}", "Tolstoy", "Einstein", "Tolstoy"),
]


def tiny_hparams(method: str, model: PreTrainedModel, **overrides: object) -> MethodHParams:
    """``method``'s defaults for ``model`` with :data:`TINY_OVERRIDES` and ``overrides``."""
    cfg = model.config
    base = defaults_for(method, cfg.model_type, cfg.num_hidden_layers, 64)
    return with_overrides(base, {**TINY_OVERRIDES[method], **overrides})


def tiny_ctx(model: PreTrainedModel, tok: object, hp: MethodHParams, root: Path) -> EditContext:
    """An edit context whose statistics (64 self-sampled sequences of 16 tokens) are
    cached under ``root``, per model kind."""
    profile = profile_for(model)
    params = [profile.mlp_out_param(layer) for layer in hp.layers]
    cache = StatsCache(root, f"tiny-{model.config.model_type}")
    return EditContext(stats_provider=stats_provider(cache, model, tok, params, "self", 64, 16))
