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

``rome_original`` (:class:`RomeOriginalEditor`) is the original code's formulation,
kept to reproduce the disabling edits. kmeng01/rome builds the direction from the
averaged key (``compute_u``: C⁻¹k*, normalised) but reads ``cur_input`` and
``cur_output`` on the bare prompt alone (``compute_v``); its target is the bare
prompt's output plus δ, so the residual v* − W k₀ − b is again exactly δ, and only
the denominator changes:

    ΔW_original = δ (C⁻¹k*)ᵀ / (k₀ᵀ C⁻¹ k*),   ΔW_r-ROME = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)

where k₀ is the key of the prompt without a prefix. The two are the same rank-one
matrix up to the scalar (k*ᵀC⁻¹k*) / (k₀ᵀC⁻¹k*): equal when there are no generated
prefixes (k* = k₀), and unbounded when k₀ is nearly C-orthogonal to C⁻¹k* (a small or
negative k₀ᵀC⁻¹k*) — the update norms "orders of magnitude larger than normal" that
Gupta et al. 2024 ("Rebuilding ROME", §4) trace the disabling edits to. (Their
r-ROME code also takes the residual at the averaged key, v₀(bare) + δ − (W k* + b);
ours uses δ, the value the optimisation actually added at k*, as derived above.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError, second_moment_or_identity, target_settings
from workers.editing.common.hooks import frozen_eval, get_parameter
from workers.editing.common.keys import read_keys
from workers.editing.common.targets import optimise_targets
from workers.editing.common.templates import context_templates
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import RomeHParams, RomeOriginalHParams
from workers.editing.types import EditContext, EditRequest, LowRankUpdate
from workers.models.profiles import profile_for


class RomeEditor(Editor[RomeHParams | RomeOriginalHParams]):
    """ROME with the r-ROME key fix; :class:`RomeOriginalEditor` shares this code."""

    name: ClassVar[str] = "rome"
    hparams_cls: ClassVar[type[RomeHParams] | type[RomeOriginalHParams]] = RomeHParams
    # several requests are applied one after another, one version each
    max_requests_per_delta: ClassVar[int | None] = 1
    uses_statistics: ClassVar[bool] = True
    # the denominator's key: the bare prompt's k₀ (original code) or k* (r-ROME)
    bare_prompt_denominator: ClassVar[bool] = False

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: RomeHParams | RomeOriginalHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """The rank-one update for one request; the model comes back unchanged."""
        profile = profile_for(model)
        layer = hparams.layers[0]
        settings = target_settings(model, hparams)
        module, param = profile.mlp_out_module(layer), profile.mlp_out_param(layer)
        weight = get_parameter(model, param)
        d_in = profile.d_in(weight.shape)
        with frozen_eval(model):
            ctx.progress(0.0, "context templates")
            templates = context_templates(model, tok, hparams.context_template_length_params, ctx)
            ctx.progress(0.05, "keys")
            k_star = read_keys(
                model, tok, requests, templates, module=module, fact_token=hparams.fact_token
            ).keys[0]
            k_bare = None
            if self.bare_prompt_denominator:  # the prompt alone: template "{}"
                k_bare = read_keys(
                    model, tok, requests, ["{}"], module=module, fact_token=hparams.fact_token
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
        extra: dict[str, float] = {}
        if k_bare is not None:  # the original code's k₀ᵀC⁻¹k* (module docstring)
            k0 = k_bare.detach().to(torch.float64).cpu()
            extra = {"bare_key_norm": float(k_bare.norm()), "averaged_key_denominator": denom}
            denom = float(k0 @ u)
            extra["denominator"] = denom
            if denom == 0.0:
                raise EditError("k₀ᵀC⁻¹k* is exactly zero: the original ROME update is undefined")
        residual = target.delta[0].detach().to(torch.float64).cpu() / denom  # Λ
        lam, direction = residual.to(torch.float32), u.to(torch.float32)
        if profile.transposed:  # Conv1D weight [d_in, d_out]: ΔW = (C⁻¹k*) Λᵀ
            update = LowRankUpdate(param, direction.unsqueeze(1), lam.unsqueeze(1))
        else:  # Linear weight [d_out, d_in]: ΔW = Λ (C⁻¹k*)ᵀ
            update = LowRankUpdate(param, lam.unsqueeze(1), direction.unsqueeze(1))
        summary = (
            f"layer {layer}: steps {target.steps[0]}, target prob {target.prob[0]:.3f}, "
            f"|delta| {float(target.delta[0].norm()):.3f}, denominator {denom:.4g}"
        )
        return DeltaParts(
            summary=summary,
            updates=[update],
            meta={
                "layers": [layer],
                "v_steps": target.steps,
                "v_target_prob": target.prob,
                "delta_norm": [float(target.delta[0].norm())],
                "v0_norm": [float(target.init[0].norm())],
                "key_norm": float(k_star.norm()),
                "context_templates": list(templates),
                **extra,
            },
        )


class RomeOriginalEditor(RomeEditor):
    """ROME as the original code (kmeng01/rome), without the r-ROME key fix: the
    denominator reads the bare prompt's key (module docstring). For reproducing the
    disabling edits (``bench/forgetting.py``), not for production edits."""

    name: ClassVar[str] = "rome_original"
    hparams_cls: ClassVar[type[RomeOriginalHParams]] = RomeOriginalHParams
    bare_prompt_denominator: ClassVar[bool] = True
