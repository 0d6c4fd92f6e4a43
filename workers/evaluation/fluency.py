"""The ``fluency`` suite: n-gram entropy of greedy generations and perplexity on a
fixed text set (pure torch; no database, no Redis).

A disabling edit (Gupta et al. 2024, "Model editing at scale leads to gradual and
catastrophic forgetting") leaves a model that repeats itself ("CBS CBS CBS") and
finds ordinary text improbable. The two numbers here measure exactly that:

- **n-gram entropy** (Meng et al. 2022, ROME, §4.2 "generation entropy"): for each
  generated text, the Shannon entropy (bits) of its word 2-gram and 3-gram
  frequency distributions, weighted 2/3 and 4/3 and averaged; then the mean over
  the texts. Repetitive text has few distinct n-grams, so a low entropy. Words are
  split on whitespace with punctuation marks as words of their own (``\\w+`` or
  one non-space, non-word character); ROME splits with NLTK's word tokenizer,
  which differs on contractions and the like, so the absolute values are close to
  but not the same as ROME's.
- **perplexity**: exp of the token-weighted mean negative log-likelihood over the
  texts, every token after the first of each text predicted from the ones before it
  (the tokenizer's own special tokens included, as :mod:`workers.evaluation.scoring`
  treats prompts). Token-weighted means exp(Σ NLL / Σ tokens), not the mean of the
  per-text perplexities.

The prompts and texts ship in ``workers/evaluation/data/`` (written for memedit).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from workers.evaluation.scoring import generate

DEFAULT_MAX_NEW_TOKENS = 50
MAX_NEW_TOKENS_LIMIT = 512
# ROME's weights for the 2-gram and 3-gram entropies
NGRAM_ORDERS: tuple[int, ...] = (2, 3)
NGRAM_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)

_WORD = re.compile(r"\w+|[^\w\s]")


# -- the fixed data ---------------------------------------------------------------------
def _load(name: str, key: str) -> tuple[str, ...]:
    raw = resources.files("workers.evaluation").joinpath("data", name).read_text("utf-8")
    items = json.loads(raw)[key]
    if not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise RuntimeError(f"{name}: '{key}' must be a non-empty list of non-empty strings")
    return tuple(items)


@cache
def fixed_texts() -> tuple[str, ...]:
    """The fixed perplexity texts (``data/fluency_texts.json``), in file order."""
    return _load("fluency_texts.json", "texts")


@cache
def fixed_prompts() -> tuple[str, ...]:
    """The fixed generation prompts (``data/fluency_prompts.json``), in file order."""
    return _load("fluency_prompts.json", "prompts")


# -- perplexity -----------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_length(model: torch.nn.Module, tok: Any) -> int | None:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(model.config, "n_positions", None),
    ]
    known = [int(x) for x in limits if isinstance(x, int) and x > 1]
    return min(known) if known else None


def token_nll(
    model: torch.nn.Module,
    tok: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[tuple[float, int]]:
    """Per text: (Σ NLL in nats, number of predicted tokens), in the order given.

    Each text is tokenized alone (with the tokenizer's special tokens) and cut to
    ``max_length`` tokens (default: the model's context length). Texts are batched
    by length, right-padded, with an attention mask; token i ≥ 1 is scored by the
    log-softmax at position i − 1. A text of fewer than two tokens predicts nothing:
    (0.0, 0).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    limit = max_length if max_length is not None else _max_length(model, tok)
    encoded = [list(tok(t)["input_ids"]) for t in texts]
    if limit is not None:
        encoded = [ids[:limit] for ids in encoded]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    order = sorted(
        (i for i, ids in enumerate(encoded) if len(ids) >= 2), key=lambda i: -len(encoded[i])
    )
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    device = _device(model)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = len(encoded[chunk[0]])
            ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(2, ids[:, 1:].to(logp.device)[..., None])[..., 0]
            for r, i in enumerate(chunk):
                n = len(encoded[i]) - 1
                out[i] = (-float(picked[r, :n].double().sum()), n)
    return out


def perplexity(
    model: torch.nn.Module,
    tok: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> float:
    """Token-weighted perplexity exp(Σ NLL / Σ tokens) over ``texts`` (see
    :func:`token_nll`). Raises ValueError if no text has two tokens."""
    pairs = token_nll(model, tok, texts, batch_size=batch_size, max_length=max_length)
    return perplexity_of(pairs)


def perplexity_of(pairs: Sequence[tuple[float, int]]) -> float:
    """exp(Σ NLL / Σ tokens) of :func:`token_nll`'s pairs (inf on overflow)."""
    total = sum(n for _, n in pairs)
    if total == 0:
        raise ValueError("no text has two tokens: nothing to score")
    mean = sum(nll for nll, _ in pairs) / total
    return math.exp(mean) if mean < 700 else math.inf


# -- n-gram entropy ----------------------------------------------------------------------
def words(text: str) -> list[str]:
    """The words of ``text`` as the n-gram entropy counts them (see the module doc)."""
    return _WORD.findall(text)


def text_ngram_entropy(
    text: str,
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Weighted n-gram entropy of one text (Meng et al. 2022): the mean over the
    orders n of w_n · H_n, H_n = −Σ p log₂ p over the text's n-gram frequencies.
    An order with no n-gram (text shorter than n words) contributes 0."""
    if len(orders) != len(weights) or not orders:
        raise ValueError("orders and weights must be non-empty and of the same length")
    toks = words(text)
    terms = []
    for n, w in zip(orders, weights, strict=True):
        counts = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def ngram_entropy(
    texts: Sequence[str],
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """The arithmetic mean of :func:`text_ngram_entropy` over ``texts``."""
    if not texts:
        raise ValueError("no texts")
    return sum(text_ngram_entropy(t, orders, weights) for t in texts) / len(texts)


# -- the suite --------------------------------------------------------------------------
def _params(params: Mapping[str, Any]) -> tuple[int, list[str]]:
    max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int):
        raise ValueError("max_new_tokens must be an integer")
    if not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    prompts = params.get("prompts")
    if prompts is None:
        return max_new, list(fixed_prompts())
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    return max_new, list(prompts)


def run_suite(
    model: torch.nn.Module,
    tok: Any,
    params: Mapping[str, Any],
    *,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Suite ``fluency``: greedy generations of ``max_new_tokens`` (default 50) from the
    fixed prompts (or ``params["prompts"]``), scored by n-gram entropy, and the
    perplexity of the fixed text set. Other keys of ``params`` are ignored.

    Returns ``{"metrics": {"ngram_entropy", "perplexity"}, "details": {...}}``; the
    details hold every generation with its entropy and the token counts. The model
    is put in eval mode for the run (and back), its weights are not touched.
    """
    max_new, prompts = _params(params)
    texts = fixed_texts()
    was_training = model.training
    model.eval()
    try:
        generations = []
        for i, prompt in enumerate(prompts):
            if progress is not None:
                progress(i / (len(prompts) + 1), f"generating {i + 1} of {len(prompts)}")
            text = generate(model, tok, prompt, max_new)
            generations.append(
                {"prompt": prompt, "text": text, "ngram_entropy": text_ngram_entropy(text)}
            )
        if progress is not None:
            progress(len(prompts) / (len(prompts) + 1), "perplexity of the fixed texts")
        pairs = token_nll(model, tok, texts)
    finally:
        model.train(was_training)
    if progress is not None:
        progress(1.0, "done")
    return {
        "metrics": {
            "ngram_entropy": sum(g["ngram_entropy"] for g in generations) / len(generations),
            "perplexity": perplexity_of(pairs),
        },
        "details": {
            "max_new_tokens": max_new,
            "generations": generations,
            "perplexity_texts": len(texts),
            "perplexity_tokens": sum(n for _, n in pairs),
        },
    }
