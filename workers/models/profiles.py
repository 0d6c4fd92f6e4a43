"""Where the editable weights live in each architecture, keyed by ``config.model_type``.

Editing methods ask a profile for module paths; they never spell a layer path
themselves. ``mlp_out`` is the MLP's output projection, the matrix that ROME and
MEMIT treat as a linear key→value memory: its input is the key k (the MLP's hidden
activation), its output is added to the residual stream.

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` whose weight is stored
``[d_in, d_out]`` (transposed against ``nn.Linear``'s ``[d_out, d_in]``);
``transposed=True`` records that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchProfile:
    model_type: str
    layers: str  # the ModuleList of transformer blocks
    mlp_out: str  # template with {} for the layer index
    transposed: bool  # weight stored [d_in, d_out] (Conv1D)
    final_norm: str
    lm_head: str
    embed: str

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_out_module(self, i: int) -> str:
        return self.mlp_out.format(i)

    def mlp_out_param(self, i: int) -> str:
        return self.mlp_out.format(i) + ".weight"

    def layer_of_param(self, param: str) -> int | None:
        """Layer index of a parameter name under ``layers``, or None."""
        prefix = self.layers + "."
        if not param.startswith(prefix):
            return None
        head = param[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


_LLAMA = dict(
    layers="model.layers",
    mlp_out="model.layers.{}.mlp.down_proj",
    transposed=False,
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

PROFILES: dict[str, ArchProfile] = {
    p.model_type: p
    for p in [
        ArchProfile(
            model_type="gpt2",
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.c_proj",
            transposed=True,
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            embed="transformer.wte",
        ),
        ArchProfile(
            model_type="gptj",
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.fc_out",
            transposed=False,
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            embed="transformer.wte",
        ),
        ArchProfile(
            model_type="gpt_neox",
            layers="gpt_neox.layers",
            mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
            transposed=False,
            final_norm="gpt_neox.final_layer_norm",
            lm_head="lm_head",
            embed="gpt_neox.embed_in",
        ),
        ArchProfile(model_type="llama", **_LLAMA),
        ArchProfile(model_type="mistral", **_LLAMA),
        ArchProfile(model_type="qwen2", **_LLAMA),
        ArchProfile(model_type="qwen3", **_LLAMA),
    ]
}


class UnsupportedArchitecture(ValueError):
    pass


def profile_for(model: torch.nn.Module) -> ArchProfile:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return PROFILES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no editing profile for model_type {model_type!r}; known: {sorted(PROFILES)}"
        ) from None


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)
