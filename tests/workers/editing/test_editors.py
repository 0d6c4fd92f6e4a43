"""Editor conformance on tiny random models (every method × gpt2, gptj, llama, gpt_neox)
(the hyper-parameters are tested in ``test_hparams.py``).

A delta is applied the way the service applies it: through a ``ModelRuntime``
(stage + commit) on a fresh copy of the model, so weight updates and module state
(GRACE's codebook, applied by the runtime's adaptor hook) are checked alike.

Tiny random models can only be steered through the subject's last token when it is
the prompt's last token (their attention hardly moves information), so the
requests here end with the subject.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import (
    REQUESTS,
    TINY_KINDS,
    changed_tensors,
    state_copy,
    tiny_ctx,
    tiny_hparams,
    tiny_model,
)
from workers.editing import registry
from workers.editing.common.base import EditError
from workers.editing.common.keys import read_keys
from workers.editing.common.prompts import RowBuilder
from workers.editing.common.targets import _SplitRun
from workers.editing.common.tokens import PromptError, fill, subject_last_index
from workers.editing.editor import Editor
from workers.editing.hparams import (
    HPARAMS_CLASSES,
    METHODS,
    with_overrides,
)
from workers.editing.types import (
    DenseUpdate,
    EditContext,
    EditRequest,
    LowRankUpdate,
    WeightDelta,
)
from workers.models.profiles import profile_for
from workers.runtime import ModelRuntime


def requests_for(method: str) -> list[EditRequest]:
    per_delta = registry.EDITORS[method].max_requests_per_delta
    return REQUESTS[:per_delta] if per_delta else REQUESTS


def uses_statistics(method: str) -> bool:
    return "mom2_adjustment" in HPARAMS_CLASSES[method].model_fields


def apply_via_runtime(model, delta: WeightDelta) -> tuple[torch.nn.Module, ModelRuntime]:
    """A fresh copy of ``model`` at version 1 = ``delta``, applied as the service
    applies it (``ModelRuntime.stage`` + ``commit``: weights and module state)."""
    edited = tiny_model(model.config.model_type)
    edited.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    rt = ModelRuntime(edited)
    rt.commit(rt.stage(delta), 1)
    return edited, rt


def next_token_probs(model, tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -1].softmax(-1)


@pytest.fixture(scope="module")
def computed(tok, stats_root):
    """(model, state before, delta) per (method, kind), computed once for the module."""
    out = {}

    def get(method: str, kind: str):
        if (method, kind) not in out:
            model = tiny_model(kind)
            hp = tiny_hparams(method, model)
            before = state_copy(model)
            ctx = tiny_ctx(model, tok, hp, stats_root)
            delta = registry.get_editor(method).compute_delta(
                model, tok, requests_for(method), hp, ctx
            )
            out[method, kind] = (model, before, delta, hp)
        return out[method, kind]

    return get


CASES = [(m, k) for m in METHODS for k in TINY_KINDS]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_model_unchanged_and_no_hooks_left(computed, method, kind):
    model, before, _delta, _hp = computed(method, kind)
    assert changed_tensors(model, before) == []
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_delta_makes_target_most_likely(computed, tok, method, kind):
    model, _before, delta, _hp = computed(method, kind)
    edited, _rt = apply_via_runtime(model, delta)
    for req in requests_for(method):
        target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"][0]
        before = next_token_probs(model, tok, req.text)
        after = next_token_probs(edited, tok, req.text)
        assert int(after.argmax()) == target, (req, float(after[target]), float(after.max()))
        assert float(after[target]) > float(before[target]) + 0.1


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_delta_finite_on_its_layers_and_round_trips(computed, method, kind):
    """Whatever a delta carries sits on the hparams' layers: low-rank updates of
    their MLP output projections with the batch size as rank (ROME, MEMIT), dense
    non-zero fp32 updates in the parameter's layout (fine-tuning), module state
    (GRACE) on those projections; it is finite and survives serialisation bit for
    bit, update kinds included."""
    model, _before, delta, hp = computed(method, kind)
    profile = profile_for(model)
    assert delta.method == method
    assert delta.is_finite()
    assert delta.updates or delta.modules
    layers = {profile.mlp_out_param(layer) for layer in hp.layers}
    modules = {profile.mlp_out_module(layer) for layer in hp.layers}
    assert set(delta.params) <= layers
    assert {s.module for s in delta.modules.values()} <= modules
    touched = set(delta.params) | {s.module + ".weight" for s in delta.modules.values()}
    assert touched == layers
    rank = len(requests_for(method))
    for update in delta.updates:
        shape = tuple(model.get_parameter(update.param).shape)
        if isinstance(update, LowRankUpdate):
            assert tuple(update.left.shape) == (shape[0], rank)
            assert tuple(update.right.shape) == (shape[1], rank)
        else:
            assert isinstance(update, DenseUpdate)
            assert update.delta.dtype == torch.float32 and tuple(update.delta.shape) == shape
            assert bool(update.delta.any())
        assert tuple(update.dense().shape) == shape
    again = WeightDelta.from_bytes(delta.to_bytes())
    assert [type(u) for u in again.updates] == [type(u) for u in delta.updates]
    first, second = delta.dense(), again.dense()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.modules.keys() == delta.modules.keys()
    for name, state in delta.modules.items():
        assert again.modules[name].module == state.module
        assert again.modules[name].tensors.keys() == state.tensors.keys()
        for key, t in state.tensors.items():
            assert again.modules[name].tensors[key].dtype == t.dtype
            assert torch.equal(again.modules[name].tensors[key], t), (name, key)
    assert again.meta == json.loads(json.dumps(delta.meta, default=str))
    assert again.to_bytes() == delta.to_bytes()


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_rome_writes_v_star_at_the_averaged_key(computed, tok, kind):
    """r-ROME: W' k* = W k* + δ, with the same k* the update was built from; this
    also pins the orientation (GPT-2's Conv1D computes k @ W, Linear W @ k)."""
    model, _before, delta, hp = computed("rome", kind)
    profile = profile_for(model)
    layer = hp.layers[0]
    templates = delta.meta["context_templates"]
    k_star = read_keys(
        model, tok, REQUESTS[:1], templates, module=profile.mlp_out_module(layer),
        fact_token=hp.fact_token,
    ).keys[0]  # fmt: skip
    d_w = delta.dense()[profile.mlp_out_param(layer)].double()
    change = k_star.double() @ d_w if profile.transposed else d_w @ k_star.double()
    assert change.shape == (model.config.hidden_size,)
    assert float(change.norm()) == pytest.approx(delta.meta["delta_norm"][0], rel=1e-4)


def _rome_pair(tok, stats_root, kind: str, prefixes: list[list[int]]):
    """(model, C, δ-carrying deltas of rome and rome_original) for the first request."""
    model = tiny_model(kind)
    out = {}
    for method in ("rome", "rome_original"):
        hp = with_overrides(
            tiny_hparams(method, model), {"context_template_length_params": prefixes}
        )
        ctx = tiny_ctx(model, tok, hp, stats_root)
        delta = registry.get_editor(method).compute_delta(model, tok, REQUESTS[:1], hp, ctx)
        out[method] = delta
    param = profile_for(model).mlp_out_param(hp.layers[0])
    c = ctx.second_moment(param).double()
    return model, hp, c, out["rome"], out["rome_original"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rome_original_differs_from_rome_only_by_its_denominator(tok, stats_root, kind):
    """The original code's update is r-ROME's times the scalar (k*ᵀC⁻¹k*) / (k₀ᵀC⁻¹k*)
    (rome.py docstring: same δ, same direction C⁻¹k*, the bare prompt's key k₀ in the
    denominator); so it writes v* exactly at k₀ where r-ROME writes it at k*."""
    model, hp, c, rome, orig = _rome_pair(tok, stats_root, kind, [[5, 3]])
    profile = profile_for(model)
    layer = hp.layers[0]
    param, module = profile.mlp_out_param(layer), profile.mlp_out_module(layer)
    templates = orig.meta["context_templates"]
    assert templates == rome.meta["context_templates"] and len(templates) == 4
    assert orig.meta["delta_norm"] == rome.meta["delta_norm"]  # the same v* optimisation

    def key(tpls: list[str]) -> torch.Tensor:
        return read_keys(
            model, tok, REQUESTS[:1], tpls, module=module, fact_token=hp.fact_token
        ).keys[0].double()  # fmt: skip

    k_star, k_bare = key(templates), key(["{}"])
    c_inv_k = torch.linalg.solve(c, k_star)
    scale = float(k_star @ c_inv_k) / float(k_bare @ c_inv_k)
    assert abs(scale - 1.0) > 1e-3  # the prefixes move the key: the formulations differ
    assert orig.meta["denominator"] == pytest.approx(float(k_bare @ c_inv_k), rel=1e-5)
    assert orig.meta["averaged_key_denominator"] == pytest.approx(float(k_star @ c_inv_k), rel=1e-5)
    d_rome, d_orig = rome.dense()[param].double(), orig.dense()[param].double()
    torch.testing.assert_close(
        d_orig, scale * d_rome, rtol=1e-4, atol=1e-7 * float(d_rome.abs().max())
    )
    for delta, k in ((orig, k_bare), (rome, k_star)):
        d_w = delta.dense()[param].double()
        change = k @ d_w if profile.transposed else d_w @ k
        assert float(change.norm()) == pytest.approx(delta.meta["delta_norm"][0], rel=1e-4)


def test_rome_original_equals_rome_without_prefixes(tok, stats_root):
    """Without generated prefixes the averaged key is the bare prompt's (k* = k₀): the
    two formulations give the same update, bit for bit."""
    model, _hp, _c, rome, orig = _rome_pair(tok, stats_root, "llama", [])
    assert orig.meta["context_templates"] == ["{}"]
    assert orig.meta["denominator"] == orig.meta["averaged_key_denominator"]
    first, second = rome.dense(), orig.dense()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert orig.method == "rome_original" and rome.method == "rome"


def test_rome_editors_refuse_each_others_hparams(tok):
    model = tiny_model("llama")
    for method, other in (("rome", "rome_original"), ("rome_original", "rome")):
        with pytest.raises(EditError, match=f"{method} needs"):
            registry.get_editor(method).compute_delta(
                model, tok, REQUESTS[:1], tiny_hparams(other, model), EditContext()
            )


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("replayed", [0, 2])
def test_split_run_equals_a_plain_forward(tok, kind, replayed):
    """The v* optimisation runs only the tokens from the subject on, over a cached
    prefix, replaying the blocks below the edited one; that must give the plain
    forward's hidden states, also after dropping rows from the cache, and leave the
    blocks' own forward in place."""
    model = tiny_model(kind)
    profile = profile_for(model)
    replay = [profile.layer(i) for i in range(replayed)]
    templates = ["{}", "The city is in Paris . {}", "He speaks . {}"]
    rows = (
        RowBuilder()
        .add_templates(tok, REQUESTS, templates, "subject_last", append_target=True)
        .add_subject_prompts(tok, REQUESTS, ["{} is a"], "subject_last")
        .build(tok)
    )
    with torch.no_grad():
        full = model.base_model(
            input_ids=rows.batch.input_ids, attention_mask=rows.batch.attention_mask
        ).last_hidden_state
        run = _SplitRun(model, tok, rows, torch.arange(rows.size), replay)
        for keep in (None, torch.tensor([0, 2, 3, 7, 9])):
            if keep is not None:
                assert run.keep(keep)
            ids = torch.arange(rows.size) if keep is None else keep
            with run.replaying():
                out = model.base_model(**run.inputs()).last_hidden_state
            for i, row in enumerate(ids.tolist()):
                start, end = int(rows.lookup[row]), int(rows.batch.attention_mask[row].sum())
                torch.testing.assert_close(out[i, : end - start], full[row, start:end])
    blocks = get_module_list(model, profile)
    assert all("forward" not in block.__dict__ for block in blocks)


def get_module_list(model, profile) -> list[torch.nn.Module]:
    return list(model.get_submodule(profile.layers))


def test_gpt2_conv1d_layout(computed):
    model, _before, delta, _hp = computed("rome", "gpt2")
    update = delta.updates[0]
    weight = model.get_parameter(update.param)
    d_mlp, d_model = 4 * model.config.n_embd, model.config.n_embd
    assert tuple(weight.shape) == (d_mlp, d_model)  # Conv1D stores [d_in, d_out]
    assert update.left.shape == (d_mlp, 1) and update.right.shape == (d_model, 1)


def test_compute_delta_is_deterministic(computed, tok, stats_root):
    model, _before, delta, hp = computed("memit", "llama")
    again = registry.get_editor("memit").compute_delta(
        model, tok, requests_for("memit"), hp, tiny_ctx(model, tok, hp, stats_root)
    )
    first, second = delta.dense(), again.dense()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.meta["context_templates"] == delta.meta["context_templates"]


def test_rome_refuses_a_batch(tok, stats_root):
    model = tiny_model("llama")
    hp = tiny_hparams("rome", model)
    with pytest.raises(EditError, match="one request at a time"):
        registry.get_editor("rome").compute_delta(
            model, tok, REQUESTS[:2], hp, tiny_ctx(model, tok, hp, stats_root)
        )


@pytest.mark.parametrize("method", [m for m in METHODS if uses_statistics(m)])
def test_failure_midway_restores_everything(tok, method):
    """A statistics provider that fails after the target optimisation (MEMIT: on its
    second layer, with the first layer's update already patched in)."""
    model = tiny_model("gpt2")
    hp = tiny_hparams(method, model)
    before = state_copy(model)
    calls = []

    def failing(param: str) -> torch.Tensor:
        calls.append(param)
        if len(calls) == (1 if len(hp.layers) == 1 else 2):
            raise RuntimeError("statistics unavailable")
        d_in = 4 * model.config.n_embd
        return torch.eye(d_in)

    ctx = EditContext(stats_provider=failing)
    with pytest.raises(RuntimeError, match="statistics unavailable"):
        registry.get_editor(method).compute_delta(model, tok, requests_for(method), hp, ctx)
    assert changed_tensors(model, before) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_failure_in_the_optimisation_restores_everything(tok, stats_root, method):
    """A progress callback that raises on its fourth call: inside the target or value
    optimisation, with the method's temporary hooks installed."""
    model = tiny_model("llama")
    hp = tiny_hparams(method, model)
    ctx = tiny_ctx(model, tok, hp, stats_root)
    before = state_copy(model)
    calls = []

    def progress(fraction: float, message: str) -> None:
        calls.append(message)
        if len(calls) == 4:
            raise RuntimeError(f"stopped at {message!r}")

    ctx.progress = progress
    with pytest.raises(RuntimeError, match="stopped at"):
        registry.get_editor(method).compute_delta(model, tok, requests_for(method), hp, ctx)
    assert changed_tensors(model, before) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_earlier_loss_layer_reads_through_the_final_norm(tok, stats_root):
    """``v_loss_layer`` below the last layer: the loss reads that block's output
    through the final norm and LM head (logit lens); the edit still lands there."""
    model = tiny_model("llama")
    hp = with_overrides(tiny_hparams("rome", model), {"v_loss_layer": 2})
    before = state_copy(model)
    delta = registry.get_editor("rome").compute_delta(
        model, tok, REQUESTS[:1], hp, tiny_ctx(model, tok, hp, stats_root)
    )
    assert changed_tensors(model, before) == []
    assert delta.is_finite() and delta.meta["v_target_prob"][0] > 0.3


def test_layer_out_of_range_is_an_edit_error(tok):
    model = tiny_model("llama")
    hp = with_overrides(tiny_hparams("rome", model), {"layers": [7]})
    with pytest.raises(EditError, match="out of range"):
        registry.get_editor("rome").compute_delta(model, tok, REQUESTS[:1], hp, EditContext())


def test_subject_last_token(tok):
    text, end = fill("{} is located in", "The Eiffel Tower")
    ids, idx = subject_last_index(tok, text, end)
    assert tok.convert_ids_to_tokens(ids)[idx] == "Tower"
    _, last = subject_last_index(tok, text, end, "last")
    assert last == len(ids) - 1
    with pytest.raises(PromptError):
        fill("no placeholder", "x")


def test_registry_is_explicit_and_checked():
    assert tuple(registry.EDITORS) == METHODS
    for method in METHODS:
        editor = registry.get_editor(method)
        assert isinstance(editor, registry.Editor)
        assert editor.name == method
        assert editor.hparams_cls.model_fields["method"].default == method
        # capabilities are declared: the statistics exactly where the hparams have them
        assert editor.uses_statistics == uses_statistics(method)
        assert editor.max_requests_per_delta == (1 if method.startswith("rome") else None)
    assert [m for m in METHODS if registry.EDITORS[m].prepares] == ["memit", "emmet", "alphaedit"]
    with pytest.raises(registry.RegistryError, match="duplicate"):
        registry._build([registry.RomeEditor, registry.RomeEditor])
    with pytest.raises(registry.UnknownEditor):
        registry.get_editor("grace-ful")
    assert list(registry.ADAPTORS) == ["grace"]
    assert isinstance(registry.get_adaptor("grace"), registry.Adaptor)
    with pytest.raises(registry.RegistryError, match="duplicate"):
        registry._build_adaptors([registry.GraceAdaptor, registry.GraceAdaptor])
    with pytest.raises(registry.UnknownAdaptor):
        registry.get_adaptor("lora")


def test_editor_declares_prepare_when_it_has_one():
    with pytest.raises(TypeError, match="prepares=True"):

        class _Claims(Editor):  # declares a preparation it does not have
            prepares = True

    with pytest.raises(TypeError, match="prepares=False"):

        class _Hides(Editor):  # has one and does not declare it
            def prepare(self, model, hparams, ctx) -> None:
                pass
