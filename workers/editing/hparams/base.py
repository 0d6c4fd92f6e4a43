"""The base of every method's hyper-parameters, and the knobs the locate-then-edit
methods (ROME, MEMIT, EMMET, AlphaEdit) share: a target vector v* optimised per
request and key statistics C. Sources of the defaults: the package docstring."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# LLaMA-7B's MLP width and MEMIT λ (zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml)
_REF_D_MLP = 11008
_REF_LAMBDA = 15000.0


class MethodHParams(BaseModel):
    """Base of every method's hyper-parameters: frozen, unknown keys rejected.

    A subclass sets ``method: Literal["<id>"] = "<id>"`` and implements
    :meth:`defaults` (its per-architecture defaults, sources cited).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] = Field(min_length=1, description="edited layers (0-based)")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        raise NotImplementedError

    @model_validator(mode="after")
    def _check_layers(self) -> Self:
        if any(layer < 0 for layer in self.layers):
            raise ValueError("layers must be non-negative")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be distinct")
        return self


class LocateEditHParams(MethodHParams):
    """Knobs shared by the locate-then-edit methods (ROME, MEMIT, …): a target vector
    v* optimised per request (ROME eq. 4) and key statistics C."""

    fact_token: Literal["subject_last", "last"] = "subject_last"
    # v* optimisation (ROME eq. 4 / MEMIT eq. 16)
    v_num_grad_steps: int = Field(25, ge=1, le=1000)
    v_lr: float = Field(1.0, gt=0)
    v_loss_layer: int | None = Field(None, description="None: the last layer")
    v_weight_decay: float = Field(1e-3, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0)
    kl_factor: float = Field(0.0625, ge=0)
    v_prob_threshold: float = Field(
        0.9, gt=0, le=1, description="stop a request's v* optimisation at this target prob."
    )
    # [length, count] pairs of generated prefixes; "{}" alone is always added
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 3),)
    # second-moment statistics C = E[k kᵀ]
    mom2_adjustment: bool = True
    mom2_dataset: str = Field(
        "self",
        description="'self' (text the model samples), 'hf:<name>[:<config>[:<split>]]' "
        "or 'file:<path>' (local text files)",
    )
    mom2_n_samples: int = Field(512, ge=1, description="sequences in the statistics corpus")
    mom2_sample_tokens: int = Field(64, ge=2, le=4096, description="tokens per sequence")

    @model_validator(mode="after")
    def _check(self) -> Self:
        for pair in self.context_template_length_params:
            if pair[0] < 1 or pair[1] < 0:
                raise ValueError("context_template_length_params: [length ≥ 1, count ≥ 0]")
        return self


def scaled_lambda(d_mlp: int, reference: float = _REF_LAMBDA) -> float:
    """A λ set for LLaMA-7B's MLP width, scaled to ``d_mlp`` (package docstring: λ
    balances λ·C against an edit key's k kᵀ, and E[kᵀC⁻¹k] = d_mlp)."""
    return round(reference * d_mlp / _REF_D_MLP, 1)
