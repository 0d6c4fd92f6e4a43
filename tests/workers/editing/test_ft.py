"""FT-L and FT-C on tiny random models: what they tune, FT-C's L∞ bound, early
stopping, and the block replay that spares the layers below the tuned one.

The conformance battery (model unchanged, target made most likely, round trips,
failure midway) runs over every method in ``test_editors.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import (
    REQUESTS,
    TINY_KINDS,
    TINY_OVERRIDES,
    changed_tensors,
    state_copy,
    tiny_hparams,
    tiny_model,
)
from tests.workers.editing.test_editors import apply_via_runtime, next_token_probs
from workers.editing import registry
from workers.editing.common.base import EditError
from workers.editing.common.replay import BlockReplay
from workers.editing.common.tokens import pad_right
from workers.editing.ft import FtSettings, finetune, inner_bound
from workers.editing.hparams import FtCHParams, FtLHParams, defaults_for, with_overrides
from workers.editing.types import EditContext
from workers.models.profiles import profile_for

hparams = tiny_hparams


def edit(method: str, model, tok, **overrides):
    hp = hparams(method, model, **overrides)
    return registry.get_editor(method).compute_delta(model, tok, REQUESTS, hp, EditContext())


def test_inner_bound_is_the_largest_float32_within_epsilon():
    for eps in (5e-4, 1e-3, 0.05, 0.3):
        b = inner_bound(eps)
        assert b <= eps and float(torch.tensor(b, dtype=torch.float32)) == b
        above = torch.nextafter(torch.tensor(b), torch.tensor(1.0))
        assert float(above) > eps
    assert inner_bound(0.5) == 0.5  # representable: unchanged
    assert float(torch.tensor(5e-4, dtype=torch.float32)) > 5e-4  # why it is needed


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_ft_c_update_respects_its_bound_exactly(tok, kind):
    """max |ΔW| ≤ ε in float64 terms, with ε not representable in float32; the bound
    binds: FT-L with the same steps goes beyond it, FT-C has entries on it."""
    model = tiny_model(kind)
    eps = 0.05
    free = edit("ft_l", model, tok, stop_prob=1.0, num_steps=15)
    bounded = edit("ft_c", model, tok, stop_prob=1.0, num_steps=15, norm_constraint=eps)
    (d,) = bounded.dense().values()
    assert float(d.abs().max()) <= eps
    assert bounded.meta["max_abs_delta"][0] <= eps and bounded.meta["norm_constraint"] == eps
    assert int((d.abs() == inner_bound(eps)).sum()) > 0
    (d_free,) = free.dense().values()
    assert float(d_free.abs().max()) > eps
    assert free.meta["norm_constraint"] is None


@pytest.mark.parametrize("method", ["ft_l", "ft_c"])
def test_moves_only_the_chosen_params(tok, method):
    """Two tuned layers: exactly their MLP output projections change when the delta
    is applied, both do, and no gradient is left on any parameter."""
    model = tiny_model("llama")
    before = state_copy(model)
    delta = edit(method, model, tok, layers=[1, 2])
    profile = profile_for(model)
    chosen = [profile.mlp_out_param(1), profile.mlp_out_param(2)]
    assert delta.params == chosen
    assert all(bool(d.any()) for d in delta.dense().values())
    assert changed_tensors(model, before) == []
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    edited, _rt = apply_via_runtime(model, delta)
    assert sorted(changed_tensors(edited, before)) == sorted(chosen)


@pytest.mark.parametrize("method", ["ft_l", "ft_c"])
def test_early_stopping_stops_once_every_target_is_reached(tok, method):
    model = tiny_model("gpt2")
    budget = TINY_OVERRIDES[method]["num_steps"]
    early = edit(method, model, tok, stop_prob=0.5)
    assert early.meta["stopped_early"] and early.meta["steps"] < budget
    assert len(early.meta["loss"]) == early.meta["steps"] + 1
    assert all(p >= 0.5 for p in early.meta["target_prob"]) and all(early.meta["target_argmax"])
    # the recorded probabilities are the edited model's (one-token targets here)
    edited, _rt = apply_via_runtime(model, early)
    for req, prob in zip(REQUESTS, early.meta["target_prob"], strict=True):
        target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"][0]
        assert float(next_token_probs(edited, tok, req.text)[target]) == pytest.approx(
            prob, abs=1e-4
        )
    # a threshold no target reaches: the whole budget is spent
    full = edit(method, model, tok, stop_prob=1.0, num_steps=12)
    assert not full.meta["stopped_early"] and full.meta["steps"] == 12


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_block_replay_equals_the_plain_forward(tok, kind):
    model = tiny_model(kind)
    profile = profile_for(model)
    batch = pad_right(
        [tok("The capital city of Toyota")["input_ids"], tok("He speaks")["input_ids"]],
        int(tok.pad_token_id),
    )
    with torch.no_grad():
        plain = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        for first in range(model.config.num_hidden_layers):
            run = BlockReplay(model, profile, first, batch.input_ids, batch.attention_mask)
            assert run.exact
            assert torch.equal(run({}), plain)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_replayed_training_equals_full_forwards(tok, kind):
    """Fine-tuning through the replay of the upper blocks gives the same ΔW as running
    the whole model at every step."""
    model = tiny_model(kind)
    profile = profile_for(model)
    params = [profile.mlp_out_param(1), profile.mlp_out_param(2)]
    settings = FtSettings(num_steps=8, lr=0.05, stop_prob=1.0, epsilon=0.1)
    fast = finetune(model, tok, REQUESTS, params, settings)
    slow = finetune(model, tok, REQUESTS, params, settings, replay=False)
    assert fast.steps == slow.steps == 8
    for name in params:
        torch.testing.assert_close(fast.deltas[name], slow.deltas[name], rtol=1e-5, atol=1e-6)


def test_deterministic(tok):
    model = tiny_model("gptj")
    first, second = edit("ft_l", model, tok), edit("ft_l", model, tok)
    assert first.meta["steps"] == second.meta["steps"]
    a, b = first.dense(), second.dense()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_hparams_and_layers_are_edit_errors(tok):
    model = tiny_model("llama")
    with pytest.raises(EditError, match="FtCHParams"):
        registry.get_editor("ft_c").compute_delta(
            model, tok, REQUESTS, hparams("ft_l", model), EditContext()
        )
    with pytest.raises(EditError, match="out of range"):
        edit("ft_l", model, tok, layers=[4])
    with pytest.raises(EditError, match="no edit requests"):
        registry.get_editor("ft_l").compute_delta(
            model, tok, [], hparams("ft_l", model), EditContext()
        )


def test_defaults_and_overrides():
    ft_l, ft_c = defaults_for("ft_l", "llama", 30, 1536), defaults_for("ft_c", "llama", 30, 1536)
    assert isinstance(ft_l, FtLHParams) and isinstance(ft_c, FtCHParams)
    assert ft_l.layers == (20,)  # PEERS.md's FT-L layer on SmolLM2
    assert ft_c.layers == (0,) and ft_c.norm_constraint == 4e-3  # ROME's FT+L layer
    assert defaults_for("ft_l", "llama", 32, 11008).layers == (21,)  # EasyEdit llama-7b
    assert defaults_for("ft_l", "llama", 4, 64).layers == (3,)
    assert (ft_l.num_steps, ft_l.lr) == (100, 5e-4)  # lr: EasyEdit / ROME; steps: measured
    assert not hasattr(ft_l, "norm_constraint") and ft_c.norm_constraint > 0
    assert not hasattr(ft_c, "mom2_dataset")  # no statistics for the worker to compute
    with pytest.raises(ValueError, match="norm_constraint"):
        with_overrides(ft_l, {"norm_constraint": 1e-3})
    with pytest.raises(ValueError, match="norm_constraint"):
        with_overrides(ft_c, {"norm_constraint": 0})
