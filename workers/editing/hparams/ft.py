"""The fine-tuning baselines' hyper-parameters (``workers/editing/ft.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field

from workers.editing.hparams.base import MethodHParams
from workers.models.profiles import layer_rules

# FT-C's L∞ bound ε (see the package docstring and docs/editing.md)
_FT_C_EPSILON = 4e-3


class _FtHParams(MethodHParams):
    """Fine-tuning baselines (FT-L, FT-C): Adam on the MLP output projections of
    ``layers``, minimising the mean per-token NLL of ``" " + target_new`` after the
    prompt, stopping early once every request's target is reached."""

    num_steps: int = Field(100, ge=1, le=1000, description="Adam steps at most")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    stop_prob: float = Field(
        0.9,
        gt=0,
        le=1,
        description="stop once every request's target tokens are each the most likely "
        "and their mean probability (exp of minus the mean NLL) reaches this",
    )


class FtLHParams(_FtHParams):
    """FT-L: unconstrained fine-tuning of one layer's MLP output projection."""

    method: Literal["ft_l"] = "ft_l"

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        """21 of 32 layers (:meth:`workers.models.profiles.LayerRules.ft_layer`)."""
        return cls(layers=(layer_rules(model_type).ft_layer(num_layers),))


class FtCHParams(_FtHParams):
    """FT-C: fine-tuning with the update bounded in L∞ (ROME's constrained FT baseline,
    after Zhu et al. 2020): ‖ΔW‖∞ ≤ ``norm_constraint`` = ε, projected after each step."""

    method: Literal["ft_c"] = "ft_c"
    norm_constraint: float = Field(
        _FT_C_EPSILON, gt=0, description="ε: every entry of ΔW stays within [−ε, ε]"
    )

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        """Layer 0, as all of ROME's constrained presets (layer 0 beat layer 20 on
        SmolLM2: docs/editing.md); ε = 4e-3, twice ROME's value for its smallest model
        (GPT-2 medium): 2e-3 keeps ES 1.00 for single edits on SmolLM2 but reaches
        only 0.75 in a batch of 16, the service's default batch."""
        return cls(layers=(0,), norm_constraint=_FT_C_EPSILON)
