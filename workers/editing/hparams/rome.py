"""ROME's hyper-parameters (both formulations: ``workers/editing/rome.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import model_validator

from workers.editing.hparams.base import LocateEditHParams
from workers.models.profiles import layer_rules


class _RomeHParams(LocateEditHParams):
    """ROME's knobs (both formulations): one layer, rank one."""

    @model_validator(mode="after")
    def _one_layer(self) -> Self:
        if len(self.layers) != 1:
            raise ValueError("ROME edits exactly one layer")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        layer = layer_rules(model_type).causal_layer(num_layers)
        return cls(layers=(layer,), v_loss_layer=num_layers - 1)


class RomeHParams(_RomeHParams):
    """ROME with the r-ROME key fix (Gupta et al. 2024): one layer, rank one."""

    method: Literal["rome"] = "rome"


class RomeOriginalHParams(_RomeHParams):
    """ROME as the original code computes it (Meng et al. 2022, kmeng01/rome), without
    the r-ROME key fix: kept to reproduce the disabling edits (issue 4). Same knobs and
    defaults as ``rome``; ``workers/editing/rome.py`` says what differs."""

    method: Literal["rome_original"] = "rome_original"
