"""Teacher-forced target scoring and the CounterFact scores (pure torch).

The definitions are CounterFact's ``test_batch_prediction`` and
``experiments/summarize.py`` as ../shared/data/README.md states them:

- ``lp(p, o)`` = the mean over the tokens t_1…t_m of ``" " + o`` (tokenized without
  special tokens) of log P(t_j | prompt tokens, t_1…t_{j−1}), natural log; the
  prompt is tokenized with the tokenizer's own special-token behaviour, and the
  log-softmax at position n_p + j − 1 is read at t_j (1-based j).
- Efficacy (ES): 1 if lp(rewrite, new) > lp(rewrite, true) (strict); paraphrase
  (PS): the mean of that indicator over the paraphrase prompts; neighborhood (NS):
  the mean of lp(p, true) > lp(p, new) over the neighborhood prompts.
- Magnitudes (EM/PM/NM, ``*_diff``): the mean of exp(lp_new) − exp(lp_true),
  swapped for neighborhood prompts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from workers.editing.types import EditRequest


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok: Any) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_pairs(
    tok: Any, prompts: Sequence[str], targets: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair: the prompt with the tokenizer's special
    tokens, the target as ``" " + target`` without them."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        p_ids = list(tok(prompt)["input_ids"])
        t_ids = list(tok(" " + target, add_special_tokens=False)["input_ids"])
        if not t_ids:
            raise ValueError(f"target {target!r} tokenizes to nothing")
        out.append((p_ids, t_ids))
    return out


def target_logprobs(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """Mean per-token natural-log probability of ``" " + target`` after each prompt.

    Sequences are the prompt's ids followed by the target's ids, right-padded in
    batches of ``batch_size``; the target token j (0-based) is read from the
    log-softmax at position n_p + j − 1.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pairs = encode_pairs(tok, prompts, targets)
    device = _device(model)
    pad = _pad_id(tok)
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            seqs = [p + t for p, t in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, (p_ids, t_ids) in enumerate(chunk):
                n_p, m = len(p_ids), len(t_ids)
                rows = logits[i, n_p - 1 : n_p - 1 + m].float()
                logp = F.log_softmax(rows, dim=-1)
                picked = logp.gather(1, torch.tensor(t_ids, device=logp.device)[:, None])
                out.append(float(picked.double().mean()))
    return out


def _indicator_mean(a: Sequence[float], b: Sequence[float]) -> float | None:
    if not a:
        return None
    return sum(1.0 if x > y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def _diff_mean(a: Sequence[float], b: Sequence[float]) -> float | None:
    if not a:
        return None
    return sum(math.exp(x) - math.exp(y) for x, y in zip(a, b, strict=True)) / len(a)


def counterfact_scores(
    model: torch.nn.Module, tok: Any, request: EditRequest, batch_size: int | None = None
) -> dict[str, Any]:
    """CounterFact efficacy/paraphrase/neighborhood of one request (by default all its
    prompts with both targets in one batch).

    Returns ``efficacy`` (1.0/0.0), ``paraphrase`` and ``neighborhood`` (means, None
    without prompts), their magnitude variants ``*_diff``, and the raw log-probs
    under ``logprobs[group] = {"new": [...], "true": [...]}``.
    """
    if not request.target_true:
        raise ValueError("counterfact_scores needs target_true (the fact being replaced)")
    groups = {
        "rewrite": [request.text],
        "paraphrase": list(request.paraphrase_prompts),
        "neighborhood": list(request.neighborhood_prompts),
    }
    prompts: list[str] = []
    targets: list[str] = []
    for group_prompts in groups.values():
        for p in group_prompts:
            prompts += [p, p]
            targets += [request.target_new, request.target_true]
    lps = target_logprobs(model, tok, prompts, targets, batch_size=batch_size or len(prompts))
    logprobs: dict[str, dict[str, list[float]]] = {}
    k = 0
    for name, group_prompts in groups.items():
        n = len(group_prompts)
        logprobs[name] = {"new": lps[k : k + 2 * n : 2], "true": lps[k + 1 : k + 2 * n : 2]}
        k += 2 * n
    rw, pa, nb = logprobs["rewrite"], logprobs["paraphrase"], logprobs["neighborhood"]
    return {
        "efficacy": _indicator_mean(rw["new"], rw["true"]),
        "paraphrase": _indicator_mean(pa["new"], pa["true"]),
        "neighborhood": _indicator_mean(nb["true"], nb["new"]),
        "efficacy_diff": _diff_mean(rw["new"], rw["true"]),
        "paraphrase_diff": _diff_mean(pa["new"], pa["true"]),
        "neighborhood_diff": _diff_mean(nb["true"], nb["new"]),
        "logprobs": logprobs,
    }


def generate(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the new text only), stopping at EOS."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be non-negative")
    device = _device(model)
    prompt_ids = list(tok(prompt)["input_ids"])
    if not prompt_ids:
        raise ValueError("the prompt tokenizes to nothing")
    limit = getattr(model.config, "max_position_embeddings", None)
    eos = tok.eos_token_id
    new_ids: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True)
        while len(new_ids) < max_new_tokens:
            nxt = int(out.logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                break
            new_ids.append(nxt)
            if limit is not None and len(prompt_ids) + len(new_ids) >= limit:
                break
            if len(new_ids) == max_new_tokens:
                break
            step = torch.tensor([[nxt]], dtype=torch.long, device=device)
            out = model(input_ids=step, cache=out.cache, use_cache=True)
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=True)
    full_text = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text) :]
    return tok.decode(new_ids, skip_special_tokens=True)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def paired_target_logprobs(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    targets_a: Sequence[str],
    targets_b: Sequence[str],
    batch_size: int = 64,
) -> list[tuple[float, float]]:
    """``(lp(p, a), lp(p, b))`` for each prompt: the values :func:`target_logprobs`
    gives, computed with about half its forward passes (for scoring many edits).

    Target token j of ``p + t`` is read at position n_p + j − 1, which sees only the
    prompt and t_1…t_{j−1} (causal attention). So one input ``p + s`` serves every
    target t whose t_1…t_{m−1} is a prefix of s: a one-token target needs the prompt
    alone, and both targets of a prompt usually share one input. Inputs are sorted by
    length before batching (little padding), and models that accept
    ``logits_to_keep`` compute the LM head only from the first position read.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not len(prompts) == len(targets_a) == len(targets_b):
        raise ValueError(f"{len(prompts)} prompts, {len(targets_a)} and {len(targets_b)} targets")
    pairs_a = encode_pairs(tok, prompts, targets_a)
    pairs_b = encode_pairs(tok, prompts, targets_b)
    seqs: list[list[int]] = []  # input ids
    reads: list[tuple[int, int, list[int]]] = []  # per target: (input, n_p, target ids)
    for (p_ids, a_ids), (_, b_ids) in zip(pairs_a, pairs_b, strict=True):
        mine: list[int] = []  # this prompt's inputs (indices into seqs)
        read_of: dict[int, tuple[int, int, list[int]]] = {}
        for which, t_ids in sorted(enumerate((a_ids, b_ids)), key=lambda x: -len(x[1])):
            need = t_ids[:-1]
            found = next((i for i in mine if seqs[i][len(p_ids) :][: len(need)] == need), None)
            if found is None:
                found = len(seqs)
                seqs.append(p_ids + need)
                mine.append(found)
            read_of[which] = (found, len(p_ids), t_ids)
        reads += [read_of[0], read_of[1]]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = _device(model)
    pad = _pad_id(tok)
    keep = _accepts_logits_to_keep(model)
    # per input: the log-softmax rows from its first read position on, and that position
    rows_of: dict[int, tuple[int, torch.Tensor]] = {}
    first_read: dict[int, int] = {}
    for i, n_p, _ in reads:
        first_read[i] = min(first_read.get(i, n_p - 1), n_p - 1)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, : len(seqs[i])] = 1
            offset = min(first_read[i] for i in chunk) if keep else 0
            kwargs = {"logits_to_keep": width - offset} if keep else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(chunk):
                lo = first_read[i] - offset
                rows = logits.logits[r, lo : len(seqs[i]) - offset].float()
                rows_of[i] = (first_read[i], F.log_softmax(rows, dim=-1))
    values: list[float] = []
    for i, n_p, t_ids in reads:
        first, logp = rows_of[i]
        lo = n_p - 1 - first
        picked = logp[lo : lo + len(t_ids)].gather(
            1, torch.tensor(t_ids, device=logp.device)[:, None]
        )
        values.append(float(picked.double().mean()))
    return list(zip(values[0::2], values[1::2], strict=True))
