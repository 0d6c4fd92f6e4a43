"""The layer-window loop shared by MEMIT, EMMET and AlphaEdit.

MEMIT (Meng et al. 2023, Alg. 1) spreads a batch of n requests over a window of
layers R with top layer L; EMMET (Gupta et al. 2024) and AlphaEdit (Fang et al.
2024) keep the loop and change only the per-layer solve:

1. for each request i a target hidden state zᵢ = hᵢᴸ + δᵢ at L's output is
   optimised (MEMIT eq. 16; :mod:`workers.editing.common.targets`);
2. then, going up the window, at each layer ℓ (the i-th of |R|), with the updates of
   the layers below already applied (temporarily):

       K  = [k_1 … k_n]              keys at ℓ, template-averaged (eq. 19)
       R  = (Z − Hᴸ) / (|R| − i)      the remaining residual at L, spread over the
                                     layers left (eq. 20)
       ΔW = R · rightᵀ               right = ``solve(param, K)``, ``[d_in, n]``

The update is a :class:`LowRankUpdate` with left = R ``[d_out, n]`` and right
``[d_in, n]`` (the two swapped for GPT-2's transposed Conv1D). Every temporary weight
change is copied back bit for bit before returning, also on errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError, target_settings
from workers.editing.common.hooks import frozen_eval, get_parameter, patched_weights
from workers.editing.common.keys import read_keys
from workers.editing.common.targets import TargetResult, optimise_targets
from workers.editing.common.templates import context_templates
from workers.editing.hparams import LocateEditHParams
from workers.editing.types import EditContext, EditRequest, LowRankUpdate
from workers.models.profiles import profile_for

# (weight name, K [d_in, n] float64) -> right [d_in, n] float64, ΔW = R · rightᵀ
LayerSolve = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class WindowEdit:
    """The per-layer updates of one batch and what produced them."""

    layers: list[int]
    updates: list[LowRankUpdate]
    keys: dict[str, torch.Tensor]  # weight name -> K [d_in, n] fp32, as solved for
    target: TargetResult
    templates: list[str]
    residual_norms: list[float]

    def meta(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "v_steps": self.target.steps,
            "v_target_prob": self.target.prob,
            "delta_norm": [float(x) for x in self.target.delta.norm(dim=-1)],
            "residual_norm": self.residual_norms,
            "context_templates": list(self.templates),
        }

    def summary(self, n_requests: int, extra: str = "") -> str:
        """The editors' log line: ``3 requests, layers [3, 4]: <extra>mean steps 12.0``."""
        mean_steps = sum(self.target.steps) / n_requests
        return f"{n_requests} requests, layers {self.layers}: {extra}mean steps {mean_steps:.1f}"


def d_in_of(model: PreTrainedModel, param: str) -> int:
    """The key width of an MLP output projection (GPT-2's Conv1D is ``[d_in, d_out]``)."""
    return profile_for(model).d_in(get_parameter(model, param).shape)


def window_params(model: PreTrainedModel, hparams: LocateEditHParams) -> list[str]:
    """The MLP output projections that ``hparams.layers`` edit, in layer order."""
    profile = profile_for(model)
    return [profile.mlp_out_param(layer) for layer in hparams.layers]


def edit_window(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: LocateEditHParams,
    ctx: EditContext,
    solve: LayerSolve,
) -> WindowEdit:
    """Run the loop above; the model comes back bit-identical."""
    profile = profile_for(model)
    settings = target_settings(model, hparams)
    layers = sorted(hparams.layers)
    z_block = profile.layer(layers[-1])
    updates: list[LowRankUpdate] = []
    keys_by_param: dict[str, torch.Tensor] = {}
    residual_norms: list[float] = []
    with frozen_eval(model):
        ctx.progress(0.0, "context templates")
        templates = context_templates(model, tok, hparams.context_template_length_params, ctx)
        ctx.progress(0.05, "target vectors")
        target = optimise_targets(
            model,
            tok,
            profile,
            requests,
            templates,
            z_block,
            settings,
            progress=lambda f, m: ctx.progress(0.05 + 0.75 * f, m),
        )
        z = (target.init + target.delta).to(torch.float64).cpu()  # [n, d]
        with patched_weights(model) as apply:
            for i, layer in enumerate(layers):
                ctx.progress(0.8 + 0.2 * i / len(layers), f"layer {layer}")
                module, param = profile.mlp_out_module(layer), profile.mlp_out_param(layer)
                readout = read_keys(
                    model,
                    tok,
                    requests,
                    templates,
                    module=module,
                    fact_token=hparams.fact_token,
                    hidden_module=z_block,
                )
                keys = readout.keys.cpu()  # [n, d_in] fp32
                resid = (z - readout.hidden.to(torch.float64).cpu()) / (len(layers) - i)
                residual_norms.append(float(resid.norm(dim=-1).mean()))
                right = solve(param, keys.to(torch.float64).T)  # [d_in, n]
                left = resid.T  # [d_out, n]
                if profile.transposed:
                    left, right = right, left
                update = LowRankUpdate(param, left.to(torch.float32), right.to(torch.float32))
                _check_shape(update, get_parameter(model, param).shape)
                apply(update)
                updates.append(update)
                keys_by_param[param] = keys.T.contiguous()
    return WindowEdit(layers, updates, keys_by_param, target, list(templates), residual_norms)


def _check_shape(update: LowRankUpdate, shape: torch.Size) -> None:
    if (update.left.shape[0], update.right.shape[0]) != tuple(shape):
        raise EditError(
            f"update for {update.param} is {update.left.shape[0]}×{update.right.shape[0]}, "
            f"the weight is {tuple(shape)}"
        )
