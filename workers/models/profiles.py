"""Architecture facts, keyed by ``config.model_type``: where the editable weights live,
how they are laid out, and where the methods' default layers sit.

Editing methods ask a profile for module paths; they never spell a layer path
themselves. ``mlp_out`` is the MLP's output projection, the matrix that ROME and
MEMIT treat as a linear key→value memory: its input is the key k (the MLP's hidden
activation), its output is added to the residual stream.

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` whose weight is stored
``[d_in, d_out]`` (transposed against ``nn.Linear``'s ``[d_out, d_in]``);
``transposed=True`` records that.

This module imports no torch: the hyper-parameters' defaults
(``workers/editing/hparams``) read :func:`layer_rules` in the API process too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MeasuredLayers:
    """Default layers measured on one model, which replace the rules' at its depth."""

    num_layers: int
    causal: int  # ROME's (and EMMET's) layer
    window: tuple[int, ...]  # MEMIT's (and AlphaEdit's) layers


@dataclass(frozen=True)
class LayerRules:
    """Where the methods' default layers sit in a model of ``num_layers`` blocks.

    - ROME's causal-tracing layer sits at ~15 % of the depth for GPT-J/LLaMA (5 of
      28/32) and ~35 % for GPT-2 XL (17 of 48) (``causal_fraction``);
    - MEMIT edits a window of 5 layers around it (GPT-J 3–8, LLaMA-7B 4–8, GPT-2 XL
      13–17): from the one below ROME's, or ending at it for GPT-2 (``window_start``,
      relative to ROME's layer);
    - EasyEdit's GRACE presets put the codebook deep in the model: LLaMA-2-7B layer 27
      of 32 (zjunlp/EasyEdit hparams/GRACE/llama-7b.yaml, also llama3.2-1b.yaml),
      GPT-J 25 of 28 (gpt-j-6b.yaml); PEERS.md ran the LLaMA preset scaled to SmolLM2:
      layer 25 of 30 (``grace_fraction``);
    - the fine-tuning baselines tune 21 of LLaMA-7B's 32 (EasyEdit
      ``hparams/FT/llama-7b.yaml``; ROME's GPT-J FT preset also tunes 21 of 28)
      (``ft_fraction``);
    - ``measured``: layers measured on a model (docs/editing.md), by depth.
    """

    causal_fraction: float = 0.15
    window_start: int = -1
    window_size: int = 5
    grace_fraction: float = 27 / 32
    ft_fraction: float = 21 / 32
    measured: tuple[MeasuredLayers, ...] = ()

    def _measured(self, num_layers: int) -> MeasuredLayers | None:
        return next((m for m in self.measured if m.num_layers == num_layers), None)

    def causal_layer(self, num_layers: int) -> int:
        """ROME's layer: ~15 % of the depth (~35 % for GPT-2), never the last layer,
        whose output is the prediction itself."""
        measured = self._measured(num_layers)
        if measured is not None:
            return measured.causal
        frac = self.causal_fraction
        return min(max(0, num_layers - 2), max(0, round(frac * num_layers)))

    def layer_window(self, num_layers: int) -> tuple[int, ...]:
        """MEMIT's window: five layers from the one below ROME's (ending at it for GPT-2,
        as MEMIT's GPT-2 XL 13–17), never the last layer."""
        measured = self._measured(num_layers)
        if measured is not None:
            return measured.window
        highest = max(0, num_layers - 2)
        last = self.window_size - 1
        first = self.causal_layer(num_layers) + self.window_start
        first = max(0, min(first, highest - last))
        return tuple(range(first, min(highest, first + last) + 1))

    def grace_layer(self, num_layers: int) -> int:
        """EasyEdit's GRACE depth (27 of 32) scaled to ``num_layers``: 25 of 30."""
        return min(num_layers - 1, max(0, round(self.grace_fraction * num_layers)))

    def ft_layer(self, num_layers: int) -> int:
        """The fine-tuning baselines' layer: 21 of LLaMA-7B's 32 (EasyEdit
        ``hparams/FT/llama-7b.yaml``; ROME's GPT-J FT preset also tunes 21 of 28), scaled
        to the depth: 20 of SmolLM2's 30, the layer PEERS.md measured EasyEdit's FT-L at."""
        return min(num_layers - 1, round(self.ft_fraction * num_layers))


# the rules of an architecture without its own: GPT-J's and LLaMA's
GENERAL_RULES = LayerRules()


@dataclass(frozen=True)
class ArchProfile:
    model_type: str
    layers: str  # the ModuleList of transformer blocks
    mlp_out: str  # template with {} for the layer index
    transposed: bool  # weight stored [d_in, d_out] (Conv1D)
    final_norm: str
    lm_head: str
    embed: str
    layer_rules: LayerRules = GENERAL_RULES

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def mlp_out_module(self, i: int) -> str:
        return self.mlp_out.format(i)

    def mlp_out_param(self, i: int) -> str:
        return self.mlp_out.format(i) + ".weight"

    def d_in(self, shape: Sequence[int]) -> int:
        """The input width of a projection weight of ``shape`` in this architecture's
        layout: ``[d_out, d_in]`` (``nn.Linear``) or ``[d_in, d_out]`` (Conv1D)."""
        return int(shape[0] if self.transposed else shape[1])

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
            layer_rules=LayerRules(causal_fraction=0.35, window_start=-4),
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
        ArchProfile(
            model_type="llama",
            **_LLAMA,
            # SmolLM2-135M (docs/editing.md)
            layer_rules=LayerRules(measured=(MeasuredLayers(30, 4, (3, 4, 5, 6, 7)),)),
        ),
        ArchProfile(model_type="mistral", **_LLAMA),
        ArchProfile(model_type="qwen2", **_LLAMA),
        ArchProfile(model_type="qwen3", **_LLAMA),
    ]
}


class UnsupportedArchitecture(ValueError):
    pass


def layer_rules(model_type: str) -> LayerRules:
    """The default-layer rules of ``model_type``; an architecture without a profile
    gets :data:`GENERAL_RULES` (its edits fail at :func:`profile_for`)."""
    profile = PROFILES.get(model_type)
    return GENERAL_RULES if profile is None else profile.layer_rules


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


def d_mlp(model: torch.nn.Module) -> int:
    """The MLP width: the key width d_in of the MLP output projection (layer 0's), the
    ``d_mlp`` that the hyper-parameters' defaults scale λ with."""
    profile = profile_for(model)
    return profile.d_in(model.get_parameter(profile.mlp_out_param(0)).shape)
