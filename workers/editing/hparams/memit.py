"""MEMIT's hyper-parameters (``workers/editing/memit.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field

from workers.editing.hparams.base import LocateEditHParams, scaled_lambda
from workers.models.profiles import layer_rules


class MemitHParams(LocateEditHParams):
    """MEMIT (Meng et al. 2023): a batch spread over a window of layers."""

    method: Literal["memit"] = "memit"
    mom2_update_weight: float = Field(2093.0, gt=0, description="λ in (λC + KKᵀ)⁻¹")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(
            layers=layer_rules(model_type).layer_window(num_layers),
            v_loss_layer=num_layers - 1,
            mom2_update_weight=scaled_lambda(d_mlp),
        )
