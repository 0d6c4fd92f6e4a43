"""ROME (Meng et al. 2022) with the r-ROME key fix (Gupta et al. 2024, "Rebuilding ROME").

ROME treats the MLP output projection W of one layer as a linear memory and inserts
the pair (k*, v*) with the smallest change under the key statistics C = E[k kᵀ]
(ROME eq. 2):

    W' = W + Λ (C⁻¹ k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

k* is the projection's input at the subject's last token averaged over context
templates (ROME eq. 3); v* is the output that makes the model say target_new
(eq. 4, :mod:`workers.editing.common.targets`). The original code used k* in the
direction C⁻¹k* but the bare prompt's key in the residual and the denominator;
r-ROME shows this inconsistency causes the "disabling" edits and uses the averaged
k* everywhere, as here. With the residual taken at k* too, v* − W k* is exactly the
optimised δ: the optimisation added δ to the projection's output on every template,
whose average is W k* + b, so v* = W k* + b + δ, and W' k* = v*.

Without ``mom2_adjustment`` C = I (EasyEdit's LLaMA preset); PEERS.md measured NS
0.80 with C against 0.62 without on SmolLM2, so C is the default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.hparams import RomeHParams
from workers.editing.common.base import (
    EditError,
    check_requests,
    second_moment_or_identity,
    target_settings,
)
from workers.editing.common.hooks import frozen_eval, get_parameter
from workers.editing.common.keys import read_keys
from workers.editing.common.targets import optimise_targets
from workers.editing.common.templates import context_templates
from workers.editing.types import EditContext, EditRequest, LowRankUpdate, WeightDelta
from workers.models.profiles import profile_for

log = logging.getLogger(__name__)


class RomeEditor:
    name: ClassVar[str] = "rome"
    hparams_cls: ClassVar[type[RomeHParams]] = RomeHParams
    # several requests are applied one after another, one version each
    max_requests_per_delta: ClassVar[int | None] = 1

    def compute_delta(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: RomeHParams,
        ctx: EditContext,
    ) -> WeightDelta:
        """The rank-one update for one request; the model comes back unchanged."""
        check_requests(requests, exactly_one=True)
        if not isinstance(hparams, RomeHParams):
            raise EditError(f"ROME needs RomeHParams, got {type(hparams).__name__}")
        started = time.perf_counter()
        profile = profile_for(model)
        layer = hparams.layers[0]
        settings = target_settings(model, hparams)
        module, param = profile.mlp_out_module(layer), profile.mlp_out_param(layer)
        weight = get_parameter(model, param)
        d_in = weight.shape[0] if profile.transposed else weight.shape[1]
        with frozen_eval(model):
            ctx.progress(0.0, "context templates")
            templates = context_templates(model, tok, hparams.context_template_length_params, ctx)
            ctx.progress(0.05, "keys")
            k_star = read_keys(
                model, tok, requests, templates, module=module, fact_token=hparams.fact_token
            ).keys[0]
            c = second_moment_or_identity(ctx, param, d_in, hparams.mom2_adjustment)
            ctx.progress(0.1, "target vector")
            target = optimise_targets(
                model,
                tok,
                profile,
                requests,
                templates,
                module,
                settings,
                progress=lambda f, m: ctx.progress(0.1 + 0.85 * f, m),
            )
        k64 = k_star.detach().to(torch.float64).cpu()
        u = torch.linalg.solve(c, k64)  # C⁻¹ k*
        denom = float(k64 @ u)
        if not denom > 0:
            raise EditError(f"k*ᵀC⁻¹k* = {denom} is not positive; the statistics are unusable")
        residual = target.delta[0].detach().to(torch.float64).cpu() / denom  # Λ
        lam, direction = residual.to(torch.float32), u.to(torch.float32)
        if profile.transposed:  # Conv1D weight [d_in, d_out]: ΔW = (C⁻¹k*) Λᵀ
            update = LowRankUpdate(param, direction.unsqueeze(1), lam.unsqueeze(1))
        else:  # Linear weight [d_out, d_in]: ΔW = Λ (C⁻¹k*)ᵀ
            update = LowRankUpdate(param, lam.unsqueeze(1), direction.unsqueeze(1))
        seconds = time.perf_counter() - started
        ctx.progress(1.0, "done")
        log.info(
            "rome layer %d: steps %d, target prob %.3f, |delta| %.3f, %.2fs",
            layer, target.steps[0], target.prob[0], float(target.delta[0].norm()), seconds,
        )  # fmt: skip
        return WeightDelta(
            method=self.name,
            updates=[update],
            meta={
                "layers": [layer],
                "v_steps": target.steps,
                "v_target_prob": target.prob,
                "delta_norm": [float(target.delta[0].norm())],
                "v0_norm": [float(target.init[0].norm())],
                "key_norm": float(k_star.norm()),
                "context_templates": list(templates),
                "seconds": round(seconds, 3),
            },
        )
