"""Reverting one edit in closed form, keeping the others (issue 15, a candidate
mechanism; not wired into the service yet: ``bench/revert.py`` measures it on
SmolLM2).

An edit of the locate-then-edit family (ROME, MEMIT, EMMET, AlphaEdit) changed the
MLP output projection W of a few layers. Let D = W − W_before at one of them: what
the edit's version and every version after it changed there. Reverting the edit
takes D away except where the other active edits need it, at their keys K_o (the
projection's input at their subject's last token, averaged over context templates,
read at the current weights):

    ΔW = −D (I − Π),   Π = K_o (K_oᵀ C⁻¹ K_o)⁻¹ K_oᵀ C⁻¹

(in the Linear layout W [d_out, d_in]; GPT-2's Conv1D is the transpose). Π is the
projection onto the span of K_o that is orthogonal in the metric of the key
statistics C (as MEMIT measures changes), so ΔW K_o = 0: every other edit keeps the
value its key maps to, exactly (up to the ridge that keeps the solves defined), and
everything else the versions since the edit changed, the edit's own effect first,
is removed. This is an approximation of "the model rebuilt without that edit": the
later edits are kept at their keys, not re-solved.

Mapping back only the edit's own key (a rank-one correction) is not enough: the
edit's ΔW also moved the keys of the prompt's other tokens, which attention carries
to the last one (tests/workers/editing/test_revert.py measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.hooks import frozen_eval, get_parameter
from workers.editing.common.keys import read_keys
from workers.editing.types import DenseUpdate, EditRequest
from workers.models.profiles import profile_for


def revert_updates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    keep: Sequence[EditRequest],
    layers: Sequence[int],
    *,
    templates: Sequence[str],
    fact_token: str,
    statistics: Callable[[str, int], torch.Tensor],
    change: Callable[[str], torch.Tensor],
    ridge: float = 1e-6,
) -> list[DenseUpdate]:
    """The updates (one per layer of ``layers``) that remove ``change(param)`` (D,
    in the parameter's layout) but at the keys of ``keep``; ``statistics(param,
    d_in)`` gives the layer's key second moment C. The model is not changed."""
    profile = profile_for(model)
    updates: list[DenseUpdate] = []
    with frozen_eval(model):
        for layer in sorted(layers):
            module, param = profile.mlp_out_module(layer), profile.mlp_out_param(layer)
            d = change(param).to(torch.float64).cpu()
            if profile.transposed:  # Conv1D stores [d_in, d_out]
                d = d.T
            d_in = d.shape[1]
            removed = -d
            if keep:
                ko = read_keys(model, tok, list(keep), templates, module=module,
                               fact_token=fact_token).keys.to(torch.float64).T.cpu()  # fmt: skip
                c = statistics(param, d_in).to(torch.float64).cpu()
                c = c + ridge * (float(c.diagonal().mean()) or 1.0) * torch.eye(d_in, dtype=c.dtype)
                c_inv_k = torch.linalg.solve(c, ko)  # [d_in, n]
                g = ko.T @ c_inv_k
                g.diagonal().add_(ridge * float(g.diagonal().mean()))
                # −D (I − Π) = −D + (D K_o)(K_oᵀ C⁻¹ K_o)⁻¹ (C⁻¹ K_o)ᵀ
                removed = removed + (d @ ko) @ torch.linalg.solve(g, c_inv_k.T)
            delta = removed.T if profile.transposed else removed
            if tuple(delta.shape) != tuple(get_parameter(model, param).shape):
                raise ValueError(f"revert update of {param} does not fit its shape")
            updates.append(DenseUpdate(param, delta.to(torch.float32)))
    return updates
