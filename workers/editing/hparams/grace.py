"""GRACE's hyper-parameters (``workers/editing/grace.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from workers.editing.hparams.base import MethodHParams
from workers.models.profiles import layer_rules


class GraceHParams(MethodHParams):
    """GRACE (Hartvigsen et al. 2023, "Aging with GRACE"): a key-value codebook with
    deferral radii at one layer's MLP output projection; the weights never change.
    Not a locate-then-edit method: no statistics, no v* (``workers/editing/grace.py``).

    Defaults from EasyEdit's LLaMA presets (zjunlp/EasyEdit
    ``hparams/GRACE/llama-7b.yaml``: ``eps: 1.0``, ``edit_lr: 1.0``, ``n_iter: 50``,
    ``eps_expand: coverage``); ``prob_threshold`` (early stop) is ours, as ROME's
    ``v_prob_threshold``. The layer: EasyEdit's depth (27 of 32) scaled to the model's
    (:meth:`workers.models.profiles.LayerRules.grace_layer`: 25 of 30).
    """

    method: Literal["grace"] = "grace"
    eps_init: float = Field(1.0, gt=0, description="ε_init: deferral radius of a new entry")
    edit_lr: float = Field(1.0, gt=0, description="Adam step size of the value training")
    n_iter: int = Field(50, ge=1, le=1000, description="value training steps at most")
    prob_threshold: float = Field(
        0.9, gt=0, le=1, description="stop training once the target's mean token prob. reaches this"
    )

    @model_validator(mode="after")
    def _one_layer(self) -> Self:
        if len(self.layers) != 1:
            raise ValueError("GRACE keeps its codebook at exactly one layer")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(layers=(layer_rules(model_type).grace_layer(num_layers),))
