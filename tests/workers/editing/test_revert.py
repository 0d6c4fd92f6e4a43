"""The closed-form revert of one edit (workers/editing/revert.py) on the tiny LLaMA:
three MEMIT edits in sequence, the first reverted (the one the unedited model got
wrong: the others' new targets were already likely). The other edits' keys keep
their values exactly, the true target wins its prompt again and the other two edits still hold. (Mapping back only the edit's
own keys, a rank-one correction per template, left the new target winning here: the
edit moved the keys of the prompt's other tokens too.)"""

from __future__ import annotations

import torch

from tests.tiny_models import REQUESTS, tiny_ctx, tiny_hparams, tiny_model
from workers.editing import registry
from workers.editing.common.keys import read_keys
from workers.editing.common.templates import context_templates
from workers.editing.revert import revert_updates
from workers.editing.types import WeightDelta
from workers.evaluation.scoring import target_logprobs
from workers.models.profiles import profile_for
from workers.runtime import ModelRuntime


def test_reverting_the_first_edit_of_three(tok, stats_root) -> None:
    model = tiny_model("llama")
    hp = tiny_hparams("memit", model)
    profile = profile_for(model)
    params = [profile.mlp_out_param(layer) for layer in hp.layers]
    rt = ModelRuntime(model)
    editor = registry.get_editor("memit")

    def margin(req) -> float:  # log p(new) − log p(true) on the request's prompt
        new, true = target_logprobs(model, tok, [req.text] * 2, [req.target_new, req.target_true])
        return new - true

    unedited = [margin(r) for r in REQUESTS]
    before: list[dict[str, torch.Tensor]] = []
    for i, req in enumerate(REQUESTS):
        before.append({p: rt.param(p).detach().clone() for p in params})
        delta = editor.compute_delta(model, tok, [req], hp, tiny_ctx(model, tok, hp, stats_root))
        rt.commit(rt.stage(delta), i + 1)
    edited = [margin(r) for r in REQUESTS]
    assert all(m > 0 for m in edited) and unedited[0] < 0, (unedited, edited)

    ctx = tiny_ctx(model, tok, hp, stats_root)
    templates = context_templates(model, tok, hp.context_template_length_params, ctx)

    def change(param: str) -> torch.Tensor:  # D: what the first edit's version and later ones did
        return rt.param(param).detach().float() - before[0][param].float()

    keep = [REQUESTS[1], REQUESTS[2]]  # REQUESTS[0] is reverted
    updates = revert_updates(
        model, tok, keep, hp.layers, templates=templates, fact_token=hp.fact_token,
        statistics=lambda p, d: ctx.second_moment(p), change=change,
    )  # fmt: skip
    assert [u.param for u in updates] == params
    # the kept edits' keys map to what they map to now: ΔW K_o = 0 (the lowest layer's
    # keys are read before any update, so exactly there)
    lowest = sorted(hp.layers)[0]
    ko = read_keys(model, tok, keep, templates, module=profile.mlp_out_module(lowest),
                   fact_token=hp.fact_token).keys.double()  # fmt: skip
    dw = updates[0].delta.double()
    assert float((dw @ ko.T).norm()) < 1e-4 * float(dw.norm()) * float(ko.norm())
    rt.commit(rt.stage(WeightDelta(method="revert", updates=list(updates))), 4)
    after = [margin(r) for r in REQUESTS]
    assert after[0] < 0, (unedited, edited, after)  # the true target wins again
    assert after[1] > 0 and after[2] > 0, (edited, after)  # the others still hold
