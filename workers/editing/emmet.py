"""EMMET (Gupta et al. 2024, "A unified framework for model editing").

EMMET is MEMIT with the preservation-memorization objective solved under an
*equality* constraint: the edited keys must map exactly to their targets,

    min ‖ΔW K₀‖²  s.t.  (W + ΔW) K = V     ⇒     ΔW = R (KᵀC'⁻¹K)⁻¹ KᵀC'⁻¹,

with R = V − W K the residuals ``[d_out, n]``, K the keys ``[d_in, n]`` and
C' = λC + ρI (λ ``mom2_update_weight``, ρ ``update_norm_lambda``). As the reference
code (zjunlp/EasyEdit ``easyeditor/models/emmet/emmet_main.py``), δI (``emmet_lambda``)
is added to KᵀC'⁻¹K against ill-conditioning, so the constraint holds up to
ΔW K = R (I − δ(KᵀC'⁻¹K + δI)⁻¹); δ = 0 makes it exact. Several layers are edited
with MEMIT's loop (:mod:`workers.editing.common.window`): the residual at the top
layer is spread over the layers left, and each layer satisfies its share.

In our factors: left = R, right = C'⁻¹K (KᵀC'⁻¹K + δI)⁻¹, from a factorisation of C
cached per layer (:func:`workers.editing.common.solves.emmet_right`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.solves import emmet_right, stats_factor
from workers.editing.common.window import d_in_of, edit_window, window_params
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import EmmetHParams
from workers.editing.types import EditContext, EditRequest, LowRankUpdate
from workers.models.profiles import profile_for


class EmmetEditor(Editor[EmmetHParams]):
    name: ClassVar[str] = "emmet"
    hparams_cls: ClassVar[type[EmmetHParams]] = EmmetHParams
    uses_statistics: ClassVar[bool] = True
    prepares: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel, hparams: EmmetHParams, ctx: EditContext) -> None:
        """Factorise each layer's C + ridge·I now (worker start-up), not on the first edit."""
        for param in window_params(model, hparams):
            d_in = d_in_of(model, param)
            stats_factor(ctx, param, d_in, hparams.mom2_adjustment, _ridge(hparams))

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: EmmetHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """One low-rank update per edited layer; the model comes back unchanged."""
        lam = hparams.mom2_update_weight
        ridge = _ridge(hparams)

        def solve(param: str, keys: torch.Tensor) -> torch.Tensor:
            d_in = d_in_of(model, param)
            factor = stats_factor(ctx, param, d_in, hparams.mom2_adjustment, ridge)
            return emmet_right(factor, keys, lam, hparams.emmet_lambda)

        window = edit_window(model, tok, requests, hparams, ctx, solve)
        transposed = profile_for(model).transposed
        gaps = [_constraint_gap(u, window.keys[u.param], transposed) for u in window.updates]
        return DeltaParts(
            summary=window.summary(len(requests)),
            updates=window.updates,
            meta={
                **window.meta(),
                "lambda": lam,
                "emmet_lambda": hparams.emmet_lambda,
                "constraint_gap": gaps,
            },
        )


def _ridge(hparams: EmmetHParams) -> float:
    """C' = λ(C + (ρ/λ)I): the factorisation of C + (ρ/λ)I is shared by every λ when ρ = 0."""
    return hparams.update_norm_lambda / hparams.mom2_update_weight


def _constraint_gap(update: LowRankUpdate, keys: torch.Tensor, transposed: bool) -> float:
    """‖ΔW K − R‖ / ‖R‖ at one layer: 0 when the equality constraint holds (δ = 0)."""
    resid, right = (update.right, update.left) if transposed else (update.left, update.right)
    r, k = resid.double(), keys.double()
    return float((r @ (right.double().T @ k) - r).norm() / r.norm())
