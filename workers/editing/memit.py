"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer").

A batch of n requests is written into the MLP output projections of a window of
layers ℓ ∈ R (Alg. 1). First, for each request i, a target hidden state
zᵢ = h_i^L + δᵢ at the top layer L is optimised (eq. 16; ``common.targets``). Then,
going up the window, at each layer ℓ (i-th of |R|):

    K  = [k_1 … k_n]            keys at ℓ, template-averaged (eq. 19), with the
                                updates of the layers below already in place
    R  = (Z − H^L) / (|R| − i)  the remaining residual at L, spread over the
                                layers left (eq. 20)
    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹     (eq. 14; λ = ``mom2_update_weight``, C = E[k kᵀ])

so ΔW = left @ rightᵀ with left = R [d_out, n] and right = (λC + KKᵀ)⁻¹K [d_in, n]
(C symmetric), or the two swapped for GPT-2's transposed Conv1D. The updates are
applied to the weights temporarily while computing the next layer and restored bit
for bit before returning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.hparams import MemitHParams
from workers.editing.common.base import (
    EditError,
    check_requests,
    second_moment_or_identity,
    target_settings,
)
from workers.editing.common.hooks import frozen_eval, get_parameter, patched_weights
from workers.editing.common.keys import read_keys
from workers.editing.common.targets import optimise_targets
from workers.editing.common.templates import context_templates
from workers.editing.types import EditContext, EditRequest, LowRankUpdate, WeightDelta
from workers.models.profiles import profile_for

log = logging.getLogger(__name__)


class MemitEditor:
    name: ClassVar[str] = "memit"
    hparams_cls: ClassVar[type[MemitHParams]] = MemitHParams

    def compute_delta(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: MemitHParams,
        ctx: EditContext,
    ) -> WeightDelta:
        """One low-rank update per layer of the window; the model comes back unchanged."""
        check_requests(requests)
        if not isinstance(hparams, MemitHParams):
            raise EditError(f"MEMIT needs MemitHParams, got {type(hparams).__name__}")
        started = time.perf_counter()
        profile = profile_for(model)
        settings = target_settings(model, hparams)
        layers = sorted(hparams.layers)
        z_block = profile.layer(layers[-1])
        updates: list[LowRankUpdate] = []
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
                    keys = readout.keys.to(torch.float64).cpu()  # [n, d_in]
                    resid = (z - readout.hidden.to(torch.float64).cpu()) / (len(layers) - i)
                    residual_norms.append(float(resid.norm(dim=-1).mean()))
                    c = second_moment_or_identity(
                        ctx, param, keys.shape[1], hparams.mom2_adjustment
                    )
                    a = hparams.mom2_update_weight * c + keys.T @ keys
                    right = torch.linalg.solve(a, keys.T)  # (λC + KKᵀ)⁻¹ K, [d_in, n]
                    left = resid.T  # [d_out, n]
                    if profile.transposed:
                        left, right = right, left
                    update = LowRankUpdate(param, left.to(torch.float32), right.to(torch.float32))
                    _check_shape(update, get_parameter(model, param).shape)
                    apply(update)
                    updates.append(update)
        seconds = time.perf_counter() - started
        ctx.progress(1.0, "done")
        log.info(
            "memit %d requests, layers %s: mean steps %.1f, %.2fs",
            len(requests), layers, sum(target.steps) / len(requests), seconds,
        )  # fmt: skip
        return WeightDelta(
            method=self.name,
            updates=updates,
            meta={
                "layers": layers,
                "v_steps": target.steps,
                "v_target_prob": target.prob,
                "delta_norm": [float(x) for x in target.delta.norm(dim=-1)],
                "residual_norm": residual_norms,
                "lambda": hparams.mom2_update_weight,
                "context_templates": list(templates),
                "seconds": round(seconds, 3),
            },
        )


def _check_shape(update: LowRankUpdate, shape: torch.Size) -> None:
    if (update.left.shape[0], update.right.shape[0]) != tuple(shape):
        raise EditError(
            f"update for {update.param} is {update.left.shape[0]}×{update.right.shape[0]}, "
            f"the weight is {tuple(shape)}"
        )
