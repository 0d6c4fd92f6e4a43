"""The prompt rows an edit runs on: every request × every context template.

Rows are request-major: request i owns T consecutive rows for its T templates,
template 0 being the bare prompt ``"{}"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from workers.editing.common.tokens import (
    PaddedBatch,
    fill,
    pad_id,
    pad_right,
    subject_last_index,
    target_ids,
)
from workers.editing.types import EditRequest


@dataclass
class PromptRows:
    batch: PaddedBatch
    lookup: torch.Tensor  # [B] index of the subject's last token in each row
    owner: torch.Tensor  # [B] request index of each row
    prompt_len: list[int]  # tokens of each row's prompt (without an appended target)

    @property
    def size(self) -> int:
        return int(self.owner.shape[0])


@dataclass
class RowBuilder:
    seqs: list[list[int]] = field(default_factory=list)
    lookup: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    prompt_len: list[int] = field(default_factory=list)

    def add_templates(
        self,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        fact_token: str,
        *,
        append_target: bool = False,
    ) -> RowBuilder:
        """Rows ``template.format(request.prompt)`` with the subject filled in. With
        ``append_target`` a row continues with the target's ids but the last (the
        teacher-forced input of the target loss)."""
        for i, req in enumerate(requests):
            text, end = fill(req.prompt, req.subject)
            tail = target_ids(tok, req.target_new)[:-1] if append_target else []
            for tpl in templates:
                prefix = tpl.split("{}")[0]
                ids, idx = subject_last_index(tok, prefix + text, len(prefix) + end, fact_token)
                self._add(ids, tail, idx, i)
        return self

    def add_subject_prompts(
        self,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        prompts: Sequence[str],
        fact_token: str,
    ) -> RowBuilder:
        """Rows of prompts about each request's subject alone (``"{} is a"``)."""
        for i, req in enumerate(requests):
            for tpl in prompts:
                text, end = fill(tpl, req.subject)
                ids, idx = subject_last_index(tok, text, end, fact_token)
                self._add(ids, [], idx, i)
        return self

    def _add(self, ids: list[int], tail: list[int], idx: int, owner: int) -> None:
        self.seqs.append(ids + list(tail))
        self.lookup.append(idx)
        self.owner.append(owner)
        self.prompt_len.append(len(ids))

    def build(self, tok: PreTrainedTokenizerBase) -> PromptRows:
        return PromptRows(
            batch=pad_right(self.seqs, pad_id(tok)),
            lookup=torch.tensor(self.lookup, dtype=torch.long),
            owner=torch.tensor(self.owner, dtype=torch.long),
            prompt_len=list(self.prompt_len),
        )
