"""Suppressed targets in the v* optimisation (workers/editing/common/targets.py): a
request that supersedes an earlier edit pushes the old target back under its value
before that edit, while its own target wins. Tiny random models, every method that
optimises target vectors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.tiny_models import REQUESTS, tiny_ctx, tiny_hparams, tiny_model
from tests.workers.editing.test_editors import apply_via_runtime
from workers.editing import registry
from workers.evaluation.scoring import target_logprobs

OLD = REQUESTS[0]  # Picasso → Russian
NEW = replace(OLD, target_new="Athens")


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
def test_the_superseded_target_goes_back_under_its_unedited_value(method, tok, stats_root):
    model = tiny_model("llama")
    hp = tiny_hparams(method, model)
    editor = registry.get_editor(method)
    text = OLD.text

    def lp(m, target: str) -> float:
        return target_logprobs(m, tok, [text], [target])[0]

    unedited = lp(model, OLD.target_new)
    first, _ = apply_via_runtime(model, editor.compute_delta(model, tok, [OLD], hp,
                                                             tiny_ctx(model, tok, hp, stats_root)))  # fmt: skip
    assert lp(first, OLD.target_new) > unedited + 1.0  # the first edit took
    plain, _ = apply_via_runtime(first, editor.compute_delta(first, tok, [NEW], hp,
                                                             tiny_ctx(first, tok, hp, stats_root)))  # fmt: skip
    sup = replace(NEW, suppress=((OLD.target_new, unedited),))
    second, _ = apply_via_runtime(first, editor.compute_delta(first, tok, [sup], hp,
                                                              tiny_ctx(first, tok, hp, stats_root)))  # fmt: skip
    # the new target wins over the old one and the truth
    assert lp(second, NEW.target_new) > max(lp(second, OLD.target_new), lp(second, OLD.target_true))  # fmt: skip
    # and the old target is back at or under its unedited value, which editing the
    # new fact alone does not do
    assert lp(second, OLD.target_new) <= unedited
    assert lp(plain, OLD.target_new) > unedited + 1.0
