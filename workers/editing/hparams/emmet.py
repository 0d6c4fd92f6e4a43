"""EMMET's hyper-parameters (``workers/editing/emmet.py``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field

from workers.editing.hparams.base import LocateEditHParams, scaled_lambda
from workers.models.profiles import layer_rules

# EMMET's λ for a LLaMA (zjunlp/EasyEdit hparams/EMMET/llama3.2-3b.yaml), scaled alike
_REF_EMMET_LAMBDA = 100000.0


class EmmetHParams(LocateEditHParams):
    """EMMET (Gupta et al. 2024, "A unified framework for model editing"): MEMIT's
    window loop with the equality-constrained solve ΔW = R (KᵀC'⁻¹K + δI)⁻¹ KᵀC'⁻¹,
    C' = λC + ρI (λ ``mom2_update_weight``, ρ ``update_norm_lambda``, δ
    ``emmet_lambda``; zjunlp/EasyEdit ``easyeditor/models/emmet``).

    Defaults: δ = 0.1 and ρ = 0 as every EMMET preset (EasyEdit
    ``hparams/EMMET/*.yaml``, scalable-model-editing/unified-model-editing
    ``hparams/EMMET/*.json``); λ = 100,000 (EasyEdit ``llama3.2-3b.yaml``) scaled to
    the MLP width like MEMIT's (13,953 on SmolLM2, PEERS.md's "λ-scaled" row: ES 0.98
    where 100,000 reaches 0.58). Only δλ/(kᵀC⁻¹k) matters: C'⁻¹ = C⁻¹/λ, so λ sets how
    hard δ relaxes the equality. Layers: see
    :class:`workers.models.profiles.LayerRules` (its ``measured``) and
    ``docs/editing.md``.
    """

    method: Literal["emmet"] = "emmet"
    mom2_update_weight: float = Field(13953.5, gt=0, description="λ in C' = λC + ρI")
    emmet_lambda: float = Field(0.1, ge=0, description="δ in (KᵀC'⁻¹K + δI)⁻¹")
    update_norm_lambda: float = Field(0.0, ge=0, description="ρ in C' = λC + ρI")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(
            layers=emmet_layers(model_type, num_layers),
            v_loss_layer=num_layers - 1,
            mom2_update_weight=scaled_lambda(d_mlp, _REF_EMMET_LAMBDA),
        )


def emmet_layers(model_type: str, num_layers: int) -> tuple[int, ...]:
    """EMMET's layers: ROME's single layer, as the EMMET presets (GPT-J 5, Llama-2 5,
    GPT-2 XL 17)."""
    return (layer_rules(model_type).causal_layer(num_layers),)
