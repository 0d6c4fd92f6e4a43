"""AlphaEdit's hyper-parameters (``workers/editing/alphaedit.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from workers.editing.hparams.base import LocateEditHParams
from workers.models.profiles import layer_rules


class AlphaEditHParams(LocateEditHParams):
    """AlphaEdit (Fang et al. 2024): MEMIT's window loop with the update projected
    onto the null space of the preserved keys,

        ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹,

    P = U Uᵀ from the eigenvectors of C with eigenvalue below ``nullspace_threshold``
    and K_p K_pᵀ the keys of earlier AlphaEdit edits (the version's method state).

    Defaults: threshold 2e-2 and α (``l2``) = 10 as EasyEdit's AlphaEdit presets
    (``hparams/AlphaEdit/{llama3-8b,gpt-j-6B}.yaml``; the paper's code uses 1e-2);
    layers as MEMIT's window (the Llama-3-8B preset edits 4–8, MEMIT's LLaMA window).
    The v* knobs stay the shared defaults (see ``docs/editing.md`` for the presets'
    clamp 0.75 / weight decay 0.5, measured).
    """

    method: Literal["alphaedit"] = "alphaedit"
    nullspace_threshold: float = Field(
        2e-2, gt=0, description="eigenvalues of C below this span the editable subspace"
    )
    l2: float = Field(10.0, gt=0, description="α in (P A + αI)⁻¹")

    @model_validator(mode="after")
    def _needs_statistics(self) -> Self:
        if not self.mom2_adjustment:
            raise ValueError("AlphaEdit projects with the layer statistics: mom2_adjustment")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        window = layer_rules(model_type).layer_window(num_layers)
        return cls(layers=window, v_loss_layer=num_layers - 1)
