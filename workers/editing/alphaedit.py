"""AlphaEdit (Fang et al. 2024, "AlphaEdit: Null-Space Constrained Knowledge Editing").

MEMIT's window loop (:mod:`workers.editing.common.window`) with the update confined to
the null space of the preserved knowledge: with P = U Uᵀ, U the eigenvectors of the
layer statistics C = E[k kᵀ] whose eigenvalue is below ``nullspace_threshold``
(eq. 9–10; the reference code thresholds the singular values of C), the update is
ΔW P, so keys that live in the range of C's large eigenvectors (what the model
already knows) see no change. Earlier edits are protected as well: their keys K_p,
accumulated per layer, enter the solve (eq. 14, in our column layout)

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹        α = ``l2``

i.e. right = (P A + αI)⁻¹ P K with A = K_p K_pᵀ + K Kᵀ, computed in the m-dimensional
null space (:func:`workers.editing.common.solves.alphaedit_right`); U is computed
once per layer and cached.

State: K_p K_pᵀ per layer is part of the model's version. The editor reads the
current sum from ``ctx.state[aux_name(param)]`` (the runtime sums it over the version
chain) and returns its own increment, the batch's keys K per layer, in
``WeightDelta.aux_factors`` (the state adds K Kᵀ): n × d_in numbers per layer and
version instead of a dense d_in × d_in matrix. The keys are those the layer's update
was solved for, read with the lower layers' updates in place — the same keys the
reference code re-reads after the whole batch is written, since a layer's input
does not depend on its own or higher layers. Edits made with other methods add no
keys, so AlphaEdit does not protect them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError
from workers.editing.common.solves import alphaedit_right, nullspace_basis
from workers.editing.common.window import d_in_of, edit_window, window_params
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import AlphaEditHParams
from workers.editing.types import EditContext, EditRequest

STATE_PREFIX = "alphaedit.kkt:"


def aux_name(param: str) -> str:
    """The method-state name of a layer's accumulated K Kᵀ (hashed as ``aux:<name>``)."""
    return STATE_PREFIX + param


class AlphaEditEditor(Editor[AlphaEditHParams]):
    name: ClassVar[str] = "alphaedit"
    hparams_cls: ClassVar[type[AlphaEditHParams]] = AlphaEditHParams
    uses_statistics: ClassVar[bool] = True
    prepares: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel, hparams: AlphaEditHParams, ctx: EditContext) -> None:
        """Build each layer's null-space basis now (worker start-up; ~1 s per layer on
        SmolLM2) instead of on the first edit."""
        for param in window_params(model, hparams):
            nullspace_basis(ctx, param, d_in_of(model, param), hparams.nullspace_threshold)

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: AlphaEditHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """One projected low-rank update per layer of the window, and the batch's keys
        as the state increment; the model comes back unchanged."""
        kept: dict[str, int] = {}
        prior_edits: dict[str, bool] = {}

        def solve(param: str, keys: torch.Tensor) -> torch.Tensor:
            d_in = d_in_of(model, param)
            basis = nullspace_basis(ctx, param, d_in, hparams.nullspace_threshold)
            prior = ctx.state.get(aux_name(param))
            if prior is not None and tuple(prior.shape) != (d_in, d_in):
                raise EditError(
                    f"AlphaEdit state of {param} has shape {tuple(prior.shape)}, expected {d_in}²"
                )
            kept[param] = int(basis.shape[1])
            prior_edits[param] = prior is not None
            return alphaedit_right(basis, keys, prior, hparams.l2)

        window = edit_window(model, tok, requests, hparams, ctx, solve)
        return DeltaParts(
            summary=window.summary(len(requests), f"null space {list(kept.values())}, "),
            updates=window.updates,
            aux_factors={aux_name(p): k for p, k in window.keys.items()},
            meta={
                **window.meta(),
                "nullspace_dims": [kept[u.param] for u in window.updates],
                "prior_state": [prior_edits[u.param] for u in window.updates],
            },
        )
