"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer").

A batch of n requests is written into the MLP output projections of a window of
layers (Alg. 1; the loop is :mod:`workers.editing.common.window`). At each layer,
with K the batch's keys and R the residual spread over the layers left:

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹     (eq. 14; λ = ``mom2_update_weight``, C = E[k kᵀ])

so ΔW = left @ rightᵀ with left = R [d_out, n] and right = (λC + KKᵀ)⁻¹K [d_in, n]
(C symmetric), or the two swapped for GPT-2's transposed Conv1D. The right factor
is computed as X (I + KᵀX)⁻¹ with X = C⁻¹K/λ from a factorisation of C cached per
layer (:func:`workers.editing.common.solves.memit_right`): an n × n solve per edit
instead of a d × d one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.solves import memit_right, stats_factor
from workers.editing.common.window import d_in_of, edit_window, window_params
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import MemitHParams
from workers.editing.types import EditContext, EditRequest


class MemitEditor(Editor[MemitHParams]):
    name: ClassVar[str] = "memit"
    hparams_cls: ClassVar[type[MemitHParams]] = MemitHParams
    uses_statistics: ClassVar[bool] = True
    prepares: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel, hparams: MemitHParams, ctx: EditContext) -> None:
        """Factorise each layer's C now (worker start-up) instead of on the first edit."""
        for param in window_params(model, hparams):
            stats_factor(ctx, param, d_in_of(model, param), hparams.mom2_adjustment)

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: MemitHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """One low-rank update per layer of the window; the model comes back unchanged."""
        lam = hparams.mom2_update_weight

        def solve(param: str, keys: torch.Tensor) -> torch.Tensor:
            d_in = d_in_of(model, param)
            factor = stats_factor(ctx, param, d_in, hparams.mom2_adjustment)
            return memit_right(factor, keys, lam)

        window = edit_window(model, tok, requests, hparams, ctx, solve)
        return DeltaParts(
            summary=window.summary(len(requests)),
            updates=window.updates,
            meta={**window.meta(), "lambda": lam},
        )
