"""EMMET and AlphaEdit beyond the conformance battery (``test_editors.py``): EMMET's
equality constraint, AlphaEdit's null-space projection and its accumulated keys, on
the tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from tests.tiny_models import (
    REQUESTS,
    TINY_KINDS,
    tiny_ctx,
    tiny_hparams,
    tiny_model,
)
from tests.workers.editing.test_editors import apply_via_runtime
from workers.editing.alphaedit import aux_name
from workers.editing.common.base import EditError
from workers.editing.common.keys import read_keys
from workers.editing.hparams import AlphaEditHParams, EmmetHParams, defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditRequest, LowRankUpdate, WeightDelta
from workers.models.profiles import profile_for

MORE = [
    EditRequest("The famous actor {}", "Newton", "Moscow", "London"),
    EditRequest("The home city of {}", "Darwin", "Lisbon", "London"),
]


def linear_dw(model, update: LowRankUpdate) -> torch.Tensor:
    """ΔW in nn.Linear orientation [d_out, d_in], fp64."""
    dw = update.dense().double()
    return dw.T if profile_for(model).transposed else dw


def keys_below_applied(model, tok, delta: WeightDelta, layer: int, hp) -> torch.Tensor:
    """K [d_in, n] at ``layer`` read afresh, with the delta's lower-layer updates in place."""
    below = WeightDelta(
        delta.method,
        [u for u in delta.updates if int(u.param.split(".")[-4]) < layer],
    )
    edited, _rt = apply_via_runtime(model, below)
    profile = profile_for(model)
    readout = read_keys(
        edited, tok, REQUESTS, delta.meta["context_templates"],
        module=profile.mlp_out_module(layer), fact_token=hp.fact_token,
    )  # fmt: skip
    return readout.keys.double().T


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_emmet_writes_each_key_exactly_onto_its_target(tok, stats_root, kind):
    """With δ = 0 EMMET's constraint holds at every layer: ΔW kᵢ = rᵢ (the layer's share
    of the residual, the update's left factor), i.e. W' kᵢ = vᵢ, whatever λ; MEMIT's
    least-squares update with the same λ falls clearly short of it."""
    model = tiny_model(kind)
    lam = {"mom2_update_weight": 100.0}
    hp = with_overrides(tiny_hparams("emmet", model), {"emmet_lambda": 0.0, **lam})
    delta = get_editor("emmet").compute_delta(
        model, tok, REQUESTS, hp, tiny_ctx(model, tok, hp, stats_root)
    )
    for layer, update in zip(sorted(hp.layers), delta.updates, strict=True):
        k = keys_below_applied(model, tok, delta, layer, hp)
        dw = linear_dw(model, update)
        resid = (update.right if profile_for(model).transposed else update.left).double()
        err = float((dw @ k - resid).norm() / resid.norm())
        assert err < 1e-4, (layer, err)
    assert max(delta.meta["constraint_gap"]) < 1e-4
    memit_hp = with_overrides(tiny_hparams("memit", model), lam)
    memit = get_editor("memit").compute_delta(
        model, tok, REQUESTS, memit_hp, tiny_ctx(model, tok, memit_hp, stats_root)
    )
    first = memit.updates[0]
    k = keys_below_applied(model, tok, memit, sorted(memit_hp.layers)[0], memit_hp)
    resid = (first.right if profile_for(model).transposed else first.left).double()
    assert float((linear_dw(model, first) @ k - resid).norm() / resid.norm()) > 0.2


def test_emmet_with_unit_delta_equals_memit(tok, stats_root):
    """(KᵀC'⁻¹K + δI)⁻¹ with δ = 1 is MEMIT's (I + KᵀC'⁻¹K)⁻¹: same update."""
    model = tiny_model("llama")
    memit_hp = tiny_hparams("memit", model)
    emmet_hp = with_overrides(
        tiny_hparams("emmet", model),
        {"emmet_lambda": 1.0, "mom2_update_weight": memit_hp.mom2_update_weight},
    )
    deltas = [
        get_editor(m).compute_delta(model, tok, REQUESTS, hp, tiny_ctx(model, tok, hp, stats_root))
        for m, hp in (("memit", memit_hp), ("emmet", emmet_hp))
    ]
    a, b = (d.dense() for d in deltas)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_alphaedit_update_vanishes_on_the_preserved_subspace(tok, stats_root, kind):
    """ΔW applied to keys in the span of C's eigenvectors at or above the threshold
    (what the model already knows) is ~0; on the null space it is not."""
    model = tiny_model(kind)
    hp = tiny_hparams("alphaedit", model)
    ctx = tiny_ctx(model, tok, hp, stats_root)
    delta = get_editor("alphaedit").compute_delta(model, tok, REQUESTS, hp, ctx)
    for update, dims in zip(delta.updates, delta.meta["nullspace_dims"], strict=True):
        values, vectors = torch.linalg.eigh(ctx.second_moment(update.param).double())
        preserved = vectors[:, values >= hp.nullspace_threshold]
        free = vectors[:, values < hp.nullspace_threshold]
        assert free.shape[1] == dims and 0 < dims < values.numel()
        dw = linear_dw(model, update)
        on_preserved = float((dw @ preserved).norm())
        on_free = float((dw @ free).norm())
        assert on_preserved < 1e-5 * on_free, (update.param, on_preserved, on_free)


def test_alphaedit_state_is_the_batch_keys_and_protects_them_next_time(tok, stats_root):
    model = tiny_model("llama")
    hp = tiny_hparams("alphaedit", model)
    editor = get_editor("alphaedit")
    first = editor.compute_delta(model, tok, REQUESTS, hp, tiny_ctx(model, tok, hp, stats_root))
    profile = profile_for(model)
    params = [profile.mlp_out_param(layer) for layer in sorted(hp.layers)]
    # the increment: per layer the keys the update was solved for, K [d_in, n]
    assert list(first.aux_factors) == [aux_name(p) for p in params]
    assert first.aux == {} and first.meta["prior_state"] == [False] * 3
    for layer, param in zip(sorted(hp.layers), params, strict=True):
        k = keys_below_applied(model, tok, first, layer, hp)
        torch.testing.assert_close(first.aux_factors[aux_name(param)].double(), k)
    state = dict(first.aux_increments())
    k0 = first.aux_factors[aux_name(params[0])].double()
    torch.testing.assert_close(state[aux_name(params[0])].double(), k0 @ k0.T)

    # the second batch, on the model edited by the first, reads that state
    edited, _rt = apply_via_runtime(model, first)
    ctx = tiny_ctx(edited, tok, hp, stats_root)
    ctx.state = state
    second = editor.compute_delta(edited, tok, MORE, hp, ctx)
    assert second.meta["prior_state"] == [True] * 3
    alone = editor.compute_delta(edited, tok, MORE, hp, tiny_ctx(edited, tok, hp, stats_root))
    for i, param in enumerate(params):
        k_first = first.aux_factors[aux_name(param)].double()
        with_state = float((linear_dw(model, second.updates[i]) @ k_first).norm())
        without = float((linear_dw(model, alone.updates[i]) @ k_first).norm())
        # earlier keys enter the solve: the new update disturbs them far less
        assert with_state < 0.5 * without, (param, with_state, without)


def test_alphaedit_refuses_state_of_the_wrong_shape(tok, stats_root):
    model = tiny_model("llama")
    hp = tiny_hparams("alphaedit", model)
    ctx = tiny_ctx(model, tok, hp, stats_root)
    param = profile_for(model).mlp_out_param(sorted(hp.layers)[0])
    ctx.state = {aux_name(param): torch.zeros(3, 3)}
    with pytest.raises(EditError, match="state"):
        get_editor("alphaedit").compute_delta(model, tok, REQUESTS, hp, ctx)


def test_factored_aux_round_trips_and_marks_the_format():
    k = torch.randn(16, 3)
    delta = WeightDelta("alphaedit", aux_factors={"s": k}, aux={"d": torch.ones(2, 2)})
    again = WeightDelta.from_bytes(delta.to_bytes())
    assert torch.equal(again.aux_factors["s"], k) and torch.equal(again.aux["d"], delta.aux["d"])
    assert again.sha256() == delta.sha256()
    inc = dict(again.aux_increments())
    assert torch.equal(inc["s"], (k.double() @ k.double().T).float())
    # a reader that knows only the dense aux must refuse a delta with factors
    assert header(delta.to_bytes())["format"] == 2
    assert header(WeightDelta("memit", aux={"d": torch.ones(2)}).to_bytes())["format"] == 1
    assert not WeightDelta("x", aux_factors={"s": torch.tensor([[float("nan")]])}).is_finite()


def header(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["memedit"])


def test_hparams_defaults_and_checks():
    emmet = defaults_for("emmet", "llama", 30, 1536)
    alpha = defaults_for("alphaedit", "llama", 30, 1536)
    assert isinstance(emmet, EmmetHParams) and isinstance(alpha, AlphaEditHParams)
    assert emmet.mom2_update_weight == pytest.approx(13953.5, abs=0.1)  # 100,000 · 1536/11008
    assert emmet.emmet_lambda == 0.1 and emmet.update_norm_lambda == 0.0
    assert alpha.nullspace_threshold == 2e-2 and alpha.l2 == 10.0
    assert alpha.layers == defaults_for("memit", "llama", 30, 1536).layers
    assert emmet.v_loss_layer == alpha.v_loss_layer == 29
    with pytest.raises(ValidationError, match="mom2_adjustment"):
        with_overrides(alpha, {"mom2_adjustment": False})
    with pytest.raises(ValidationError, match="emmet_lambda"):
        with_overrides(emmet, {"emmet_lambda": -1})


def test_emmet_singular_batch_is_an_edit_error(tok, stats_root):
    """The same request twice has the same key: with δ = 0, KᵀC'⁻¹K is singular."""
    model = tiny_model("llama")
    hp = with_overrides(tiny_hparams("emmet", model), {"emmet_lambda": 0.0, "layers": [1]})
    with pytest.raises(EditError, match="singular"):
        get_editor("emmet").compute_delta(
            model, tok, [REQUESTS[0], REQUESTS[0]], hp, tiny_ctx(model, tok, hp, stats_root)
        )


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_prepare_builds_every_layer_cache_the_first_edit_needs(tok, stats_root, method):
    """``prepare`` (called by the worker at start-up) leaves nothing for the first edit
    to build: the edit adds no entry to the linear-algebra cache, and its delta is
    bit-identical to one computed without preparation."""
    from workers.editing.common.solves import CACHE_KEY  # noqa: PLC0415

    model = tiny_model("llama")
    hp = tiny_hparams(method, model)
    editor = get_editor(method)
    ctx = tiny_ctx(model, tok, hp, stats_root)
    editor.prepare(model, hp, ctx)
    built = list(ctx.cache[CACHE_KEY])
    assert len(built) == len(hp.layers)
    prepared = editor.compute_delta(model, tok, REQUESTS, hp, ctx)
    assert list(ctx.cache[CACHE_KEY]) == built
    fresh = editor.compute_delta(model, tok, REQUESTS, hp, tiny_ctx(model, tok, hp, stats_root))
    for a, b in zip(prepared.updates, fresh.updates, strict=True):
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
