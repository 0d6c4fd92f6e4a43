"""Tokenisation shared by the editors: prompts, targets and the subject's last token.

Conventions (as the CounterFact scoring in ``shared/data/README.md``): a prompt is
tokenised with the tokenizer's own special tokens (SmolLM2 and GPT-2 add no BOS),
the target is ``" " + target`` tokenised alone without special tokens, and the
model input is the prompt's ids followed by the target's ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


class PromptError(ValueError):
    """A prompt template or subject the editors cannot use."""


def fill(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its one ``{}`` replaced by ``subject``; also the subject's end
    (character offset, exclusive) in the result."""
    if template.count("{}") != 1:
        raise PromptError(f"prompt must contain exactly one '{{}}': {template!r}")
    before, after = template.split("{}")
    if "{" in before + after or "}" in before + after:
        raise PromptError(f"prompt may contain no braces besides '{{}}': {template!r}")
    return before + subject + after, len(before) + len(subject)


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PromptError(f"target {target!r} tokenises to nothing")
    return list(ids)


def subject_last_index(
    tok: PreTrainedTokenizerBase, text: str, subject_end: int, mode: str = "subject_last"
) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character
    ``subject_end - 1`` (the subject's last token; ROME's ``fact_token =
    "subject_last"``), or of the last token (``mode == "last"``)."""
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        raise PromptError(f"prompt {text!r} tokenises to nothing")
    if mode == "last":
        return ids, len(ids) - 1
    if mode != "subject_last":
        raise PromptError(f"unknown fact_token {mode!r}")
    offsets = enc.get("offset_mapping")
    if offsets is None:  # slow tokenizer: count the tokens of the text up to the subject's end
        return ids, len(tok(text[:subject_end])["input_ids"]) - 1
    char = subject_end - 1
    for i in range(len(ids) - 1, -1, -1):
        start, end = offsets[i]
        if start <= char < end:
            return ids, i
    raise PromptError(f"subject's last character not found among the tokens of {text!r}")


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S]

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def select(self, rows: torch.Tensor) -> PaddedBatch:
        return PaddedBatch(self.input_ids[rows], self.attention_mask[rows])


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    """Right-padded batch (causal models ignore what follows a position, so indices
    into each row stay valid)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return PaddedBatch(ids, mask)


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
