"""GRACE: the codebook rules, and the runtime's adaptor on tiny random models — base
weights untouched, deferral, every kind of forward (batched, left/right padded, KV
cache generation, other methods' edits), and exact versions (replay, rollback,
snapshot, discard)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactStore
from tests.tiny_models import (
    REQUESTS,
    TINY_KINDS,
    TINY_OVERRIDES,
    state_copy,
    tiny_hparams,
    tiny_model,
)
from workers.editing.common.base import EditError
from workers.editing.common.codebook import Codebook, codebook_output, nearest_keys
from workers.editing.grace import COVER_MARGIN, place
from workers.editing.hparams import defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest, ModuleState, WeightDelta
from workers.evaluation.scoring import generate, target_logprobs
from workers.models.profiles import profile_for
from workers.runtime import IntegrityError, ModelRuntime, VersionRecord

UNRELATED = [
    "Mozart plays the piano in Vienna",
    "The river in London is the Thames",
    "Marie Curie works in physics",
]


def hparams(model, **overrides):
    return tiny_hparams("grace", model, **overrides)


def grace_delta(rt: ModelRuntime, tok, requests, **overrides) -> WeightDelta:
    hp = hparams(rt.model, **overrides)
    ctx = EditContext(state=rt.method_state())
    return get_editor("grace").compute_delta(rt.model, tok, requests, hp, ctx)


def edit(rt: ModelRuntime, tok, requests, number: int, **overrides) -> WeightDelta:
    delta = grace_delta(rt, tok, requests, **overrides)
    rt.commit(rt.stage(delta), number)
    return delta


def first_target(tok, req: EditRequest) -> int:
    return tok(" " + req.target_new, add_special_tokens=False)["input_ids"][0]


def next_logits(model, tok, texts: list[str]) -> torch.Tensor:
    """Logits at each text's last token, one text at a time (no padding)."""
    with torch.no_grad():
        return torch.stack(
            [model(tok(t, return_tensors="pt")["input_ids"]).logits[0, -1] for t in texts]
        )


def grace_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# -- the codebook rules ---------------------------------------------------------------------


def book_of(keys, radii, labels) -> Codebook:
    keys = torch.tensor(keys, dtype=torch.float32)
    return Codebook(
        "m",
        keys,
        torch.arange(len(keys) * 3, dtype=torch.float32).reshape(-1, 3),
        torch.tensor(radii, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
    )


def test_place_follows_grace_radius_rules():
    init = torch.full((3,), -7.0)
    empty = Codebook.empty("m", 2, 3, "cpu")
    book, i, action, _ = place(empty, torch.tensor([0.0, 0.0]), init, [5], 1.0)
    assert (book.size, i, action, float(book.radii[0])) == (1, 0, "add", 1.0)
    assert torch.equal(book.values[0], init) and book.label_of(0) == [5]

    base = book_of([[0.0, 0.0]], [1.0], [[5, 6]])
    # far: the new ball (ε_init = 1) would not touch the entry's (radius 1)
    book, i, action, dist = place(base, torch.tensor([2.5, 0.0]), init, [5, 6], 1.0)
    assert (book.size, i, action, dist) == (2, 1, "add", 2.5)
    assert book.radii.tolist() == [1.0, 1.0]
    # same label inside the radius: train that entry, nothing else changes
    book, i, action, _ = place(base, torch.tensor([0.6, 0.0]), init, [5, 6], 1.0)
    assert (book.size, i, action) == (1, 0, "inside") and book.radii.tolist() == [1.0]
    # same label, balls overlap: expand the radius to cover the query (coverage)
    book, i, action, dist = place(base, torch.tensor([1.5, 0.0]), init, [5, 6], 1.0)
    assert (book.size, i, action) == (1, 0, "expand")
    assert float(book.radii[0]) == pytest.approx(1.5 * (1 + COVER_MARGIN))
    assert float(base.radii[0]) == 1.0  # the input codebook is not modified
    # another label, balls overlap: split the distance
    book, i, action, dist = place(base, torch.tensor([1.5, 0.0]), init, [7], 1.0)
    assert (book.size, i, action) == (2, 1, "split")
    assert book.radii.tolist() == [0.75, 0.75] and book.label_of(1) == [7]
    assert torch.equal(book.values[1], init) and torch.equal(book.values[0], base.values[0])
    # a split never grows a ball: a small radius stays, a large ε_init is cut
    small = book_of([[0.0, 0.0]], [0.2], [[5, 6]])
    book, *_ = place(small, torch.tensor([1.0, 0.0]), init, [7], 1.0)
    assert book.radii.tolist() == [pytest.approx(0.2), 0.5]
    # the very same key with another label: the newer edit takes the entry over
    book, i, action, dist = place(base, torch.tensor([0.0, 0.0]), init, [7, 8, 9], 1.0)
    assert (book.size, i, action, dist) == (1, 0, "relabel", 0.0)
    assert book.label_of(0) == [7, 8, 9] and torch.equal(book.values[0], init)
    assert book.radii.tolist() == [1.0]


def test_codebook_output_per_position_nearest_key_and_radius():
    keys = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    values = torch.tensor([[10.0], [20.0]])
    radii = torch.tensor([1.0, 2.0])
    inputs = torch.tensor([[[0.5, 0.0], [1.0, 0.0], [1.6, 0.0], [9.0, 9.0]]])
    output = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    out = codebook_output(keys, values, radii, inputs, output)
    # nearest key 0 within 1 (boundary included); 1.6 is nearest to key 1 (1.4 ≤ 2)
    assert out.tolist() == [[[10.0], [10.0], [20.0], [4.0]]]
    assert codebook_output(keys, values, radii, inputs[:, 3:], output[:, 3:]) is None
    assert codebook_output(keys[:0], values[:0], radii[:0], inputs, output) is None
    # the same position in another batch shape decides the same
    wide = inputs.expand(5, -1, -1)
    batched = codebook_output(keys, values, radii, wide, output.expand(5, -1, -1))
    assert all(torch.equal(batched[b], out[0]) for b in range(5))


def test_screened_lookup_decides_exactly_as_the_pairwise_rule():
    """The fp64 screen only skips work: on random queries with radii set exactly at,
    and one ulp below, pairwise distances, the output is the pairwise rule's."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(40, 96, generator=gen) * 4
    values = torch.randn(40, 8, generator=gen)
    near = keys[torch.randint(0, 40, (300,), generator=gen)]
    queries = torch.cat([near + torch.randn(300, 96, generator=gen) * 0.05,
                         torch.randn(200, 96, generator=gen) * 4])  # fmt: skip
    dist, idx = nearest_keys(keys, queries)
    radii = torch.full((40,), 0.2)
    at, below = idx[:100:2], idx[1:100:2]
    radii[at] = dist[:100:2]  # exactly at the boundary: inside
    radii[below] = torch.nextafter(dist[1:100:2], torch.tensor(0.0))  # one ulp short
    output = torch.randn(500, 8, generator=gen)
    hit = dist <= radii[idx]
    expected = torch.where(hit.unsqueeze(-1), values[idx], output)
    got = codebook_output(keys, values, radii, queries, output)
    assert got is not None and torch.equal(got, expected)
    assert 0 < int(hit.sum()) < 500
    for rows in (slice(0, 7), slice(250, 500), slice(3, 4)):
        part = codebook_output(keys, values, radii, queries[rows], output[rows])
        assert torch.equal(output[rows] if part is None else part, expected[rows])


# -- the adaptor in the runtime ---------------------------------------------------------------


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_edits_change_no_weight_and_take_effect(tok, kind):
    model = tiny_model(kind)
    before = state_copy(model)
    rt = ModelRuntime(model)
    base_logits = next_logits(model, tok, [r.text for r in REQUESTS])
    staged = rt.stage(grace_delta(rt, tok, REQUESTS[:2]))
    assert staged.params == () and staged.update_norm == 0.0 and staged.drift == {}
    assert sorted(staged.tensor_sha256) == [
        f"state:grace.{k}" for k in ("keys", "labels", "module", "radii", "values")
    ]
    rt.commit(staged, 1)
    edit(rt, tok, REQUESTS[2:], 2)
    # every parameter and buffer bit-identical, and the edits hold
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert rt.touched_params == frozenset()
    after = next_logits(model, tok, [r.text for r in REQUESTS])
    for i, req in enumerate(REQUESTS):
        target = first_target(tok, req)
        assert int(after[i].argmax()) == target, req
        assert float(after[i].softmax(-1)[target]) > float(base_logits[i].softmax(-1)[target])
    assert rt.modules["grace"].tensors["keys"].shape[0] == 3


def test_codebook_grows_reuses_and_relabels(tok):
    rt = ModelRuntime(tiny_model("llama"))
    sizes, actions = [], []
    for n, req in enumerate(REQUESTS, start=1):
        delta = edit(rt, tok, [req], n)
        sizes.append(delta.meta["codebook_size"])
        actions.append(delta.meta["entries"][0]["action"])
    assert sizes == [1, 2, 3] and actions == ["add"] * 3
    # the same fact again: its own entry already holds it, nothing to train
    again = edit(rt, tok, REQUESTS[:1], 4)
    entry = again.meta["entries"][0]
    assert (entry["action"], entry["index"], entry["steps"], again.meta["codebook_size"]) == (
        "inside", 0, 0, 3,
    )  # fmt: skip
    # the same prompt with a new target: the newer edit takes the entry over
    moved = dataclasses.replace(REQUESTS[0], target_new="German")
    delta = edit(rt, tok, [moved], 5)
    entry = delta.meta["entries"][0]
    assert (entry["action"], entry["index"], delta.meta["codebook_size"]) == ("relabel", 0, 3)
    logits = next_logits(rt.model, tok, [r.text for r in (moved, *REQUESTS[1:])])
    for row, req in zip(logits, (moved, *REQUESTS[1:]), strict=True):
        assert int(row.argmax()) == first_target(tok, req)


def test_unrelated_prompts_are_deferred_bit_for_bit(tok):
    model = tiny_model("gpt_neox")
    rt = ModelRuntime(model)
    probe = [*UNRELATED, *(r.text for r in REQUESTS[1:])]
    before = next_logits(model, tok, probe + [REQUESTS[0].text])
    edit(rt, tok, REQUESTS[:1], 1)
    # precondition: no position of these prompts lies within an entry's radius
    book = Codebook.from_state(rt.modules["grace"])
    module = model.get_submodule(book.module)
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    after = next_logits(model, tok, probe + [REQUESTS[0].text])
    handle.remove()
    for inputs in seen[: len(probe)]:
        dist, idx = book.nearest(inputs[0])
        assert bool((dist > book.radii[idx]).all())
    assert torch.equal(after[: len(probe)], before[: len(probe)])
    assert not torch.equal(after[-1], before[-1])


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_batched_padded_and_cached_forwards_apply_the_codebook(tok, kind):
    model = tiny_model(kind)
    rt = ModelRuntime(model)
    edit(rt, tok, REQUESTS[:2], 1)
    texts = [REQUESTS[0].text, UNRELATED[0], REQUESTS[1].text, UNRELATED[1]]
    alone = next_logits(model, tok, texts)
    # teacher-forced scoring, right-padded batches against one sequence at a time
    targets = [REQUESTS[0].target_new, "Vienna", REQUESTS[1].target_new, "Paris"]
    batched = target_logprobs(model, tok, texts, targets)
    single = [target_logprobs(model, tok, [t], [g])[0] for t, g in zip(texts, targets, strict=True)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched[0] > -0.7 and batched[2] > -0.7  # the edited facts, p > 0.5
    # a left-padded batch (position ids from the mask, as generation computes them)
    enc = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=1e-4)
    assert int(left[0].argmax()) == first_target(tok, REQUESTS[0])
    assert int(left[2].argmax()) == first_target(tok, REQUESTS[1])
    # greedy generation with a KV cache equals decoding with a full forward per token
    text = REQUESTS[0].text
    cached = generate(model, tok, text, 3)
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    full = tok.decode(ids[len(tok(text)["input_ids"]) :], skip_special_tokens=True)
    assert cached.strip() == full.strip()
    assert cached.split()[0] == REQUESTS[0].target_new


def _probe_logits(model, tok) -> torch.Tensor:
    return next_logits(model, tok, [*(r.text for r in REQUESTS), *UNRELATED])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_versions_of_the_codebook_are_exact(tok, kind, tmp_path: Path):
    """GRACE versions with a ROME edit among them (its forwards run through the
    codebook): every version re-derived — on the same runtime, a fresh one, from a
    snapshot, through a rollback record — has its recorded hashes and its outputs."""
    store = ArtifactStore(tmp_path)
    model = tiny_model(kind)
    rt = ModelRuntime(model)
    records = {0: VersionRecord(0, "base", tensor_sha256=rt.base_hashes())}
    outputs = {0: _probe_logits(model, tok)}
    rome_hp = with_overrides(
        defaults_for("rome", kind, 4, 64), {**TINY_OVERRIDES["rome"], "mom2_adjustment": False}
    )
    plan = [("grace", REQUESTS[:1]), ("grace", REQUESTS[1:2]), ("rome", REQUESTS[2:]),
            ("grace", [dataclasses.replace(REQUESTS[2], target_new="Newton")])]  # fmt: skip
    for number, (method, requests) in enumerate(plan, start=1):
        if method == "grace":
            delta = grace_delta(rt, tok, requests)
        else:
            before = state_copy(model)
            ctx = EditContext(state=rt.method_state())
            delta = get_editor("rome").compute_delta(model, tok, requests, rome_hp, ctx)
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        staged = rt.stage(delta)
        art = store.put("delta", delta.to_bytes())
        records[number] = VersionRecord(
            number, "edit", number - 1, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
        )
        rt.commit(staged, number)
        outputs[number] = _probe_logits(model, tok)
        if number == 2:
            snap = store.put("snapshot", rt.snapshot_bytes())
    assert "state:grace.keys" in records[3].tensor_sha256  # the codebook lives on under ROME
    assert (
        records[3].tensor_sha256["state:grace.keys"] == records[2].tensor_sha256["state:grace.keys"]
    )
    assert (
        records[4].tensor_sha256["state:grace.keys"] != records[3].tensor_sha256["state:grace.keys"]
    )

    def check(runtime: ModelRuntime, n: int) -> None:
        expected = dict(records[n].tensor_sha256)
        assert runtime.tensor_hashes(sorted(expected)) == expected
        assert set(runtime.tensor_hashes()) <= set(expected)
        assert torch.equal(_probe_logits(runtime.model, tok), outputs[n]), n
        assert grace_hooks(runtime.model) == (1 if "grace" in runtime.modules else 0)

    for n in (2, 0, 4, 1, 3, 0):
        rt.sync(records, n, store)
        check(rt, n)
    assert rt.modules == {} and rt.touched_params == frozenset()
    fresh = ModelRuntime(tiny_model(kind))
    fresh.sync(records, 4, store)
    check(fresh, 4)
    with_snapshot = {
        **records,
        2: dataclasses.replace(records[2], snapshot_path=snap.path, snapshot_sha256=snap.sha256),
    }
    from_snapshot = ModelRuntime(tiny_model(kind))
    report = from_snapshot.sync(with_snapshot, 4, store)
    assert (report.start, report.replayed) == ("snapshot", (3, 4))
    check(from_snapshot, 4)
    # a rollback to 1 records 1's state; a later sync verifies the codebook hashes
    touched = set().union(*(r.tensor_sha256 for k, r in records.items() if k > 0))
    fresh.sync(records, 1, store)
    records[5] = VersionRecord(5, "rollback", 1, tensor_sha256=fresh.tensor_hashes(sorted(touched)))
    assert {k: v for k, v in records[5].tensor_sha256.items() if k.startswith("state:")} == {
        k: v for k, v in records[1].tensor_sha256.items() if k.startswith("state:")
    }
    other = ModelRuntime(tiny_model(kind))
    other.sync(records, 5, store)
    assert torch.equal(_probe_logits(other.model, tok), outputs[1])
    tampered = {**records}
    tampered[5] = dataclasses.replace(
        records[5], tensor_sha256={**records[5].tensor_sha256, "state:grace.values": "0" * 64}
    )
    with pytest.raises(IntegrityError, match="state:grace.values"):
        ModelRuntime(tiny_model(kind)).sync(tampered, 5, store)


def test_stage_then_discard_puts_back_the_codebook_and_its_hook(tok):
    model = tiny_model("gpt2")
    rt = ModelRuntime(model)
    before = (_probe_logits(model, tok), rt.tensor_hashes(), grace_hooks(model))
    rt.discard(rt.stage(grace_delta(rt, tok, REQUESTS[:1])))
    assert grace_hooks(model) == 0  # version 0: no hook at all
    assert rt.modules == {}
    edit(rt, tok, REQUESTS[:1], 1)
    before = (_probe_logits(model, tok), rt.tensor_hashes(), grace_hooks(model))
    staged = rt.stage(grace_delta(rt, tok, REQUESTS[1:]))
    assert not torch.equal(_probe_logits(model, tok), before[0])
    rt.discard(staged)
    assert torch.equal(_probe_logits(model, tok), before[0])
    assert rt.tensor_hashes() == before[1] and grace_hooks(model) == before[2] == 1


def test_invalid_module_state_is_refused_before_anything_changes(tok):
    rt = ModelRuntime(tiny_model("llama"))
    good = grace_delta(rt, tok, REQUESTS[:1]).modules["grace"]
    up_proj = profile_for(rt.model).layer(1) + ".mlp.up_proj"  # 32 → 64: keys do not fit

    def with_tensor(**tensors) -> WeightDelta:
        return WeightDelta(
            "grace", modules={"grace": ModuleState(good.module, {**good.tensors, **tensors})}
        )  # noqa: E501

    bad = {
        "unknown module state": WeightDelta("x", modules={"lora": good}),
        "has no module": WeightDelta(
            "x", modules={"grace": ModuleState("model.nope", good.tensors)}
        ),  # noqa: E501
        "values has shape": with_tensor(values=torch.zeros(1, 5)),
        "finite": with_tensor(keys=torch.full_like(good.tensors["keys"], float("nan"))),
        "non-negative": with_tensor(radii=torch.tensor([-1.0])),
        "labels must be integer": with_tensor(labels=torch.zeros(1, 1)),
        "keys has shape": WeightDelta("x", modules={"grace": ModuleState(up_proj, good.tensors)}),
    }
    for message, delta in bad.items():
        with pytest.raises(ValueError, match=message):
            rt.stage(delta)
        assert rt.modules == {} and grace_hooks(rt.model) == 0


def test_a_codebook_at_another_layer_is_an_edit_error(tok):
    rt = ModelRuntime(tiny_model("llama"))
    edit(rt, tok, REQUESTS[:1], 1)
    with pytest.raises(EditError, match="codebook sits at"):
        grace_delta(rt, tok, REQUESTS[1:2], layers=[2])


def test_compute_delta_is_deterministic(tok):
    rt = ModelRuntime(tiny_model("gptj"))
    edit(rt, tok, REQUESTS[:1], 1)
    first, second = (grace_delta(rt, tok, REQUESTS[1:]) for _ in range(2))
    assert first.modules.keys() == second.modules.keys() == {"grace"}
    for key, t in first.modules["grace"].tensors.items():
        assert torch.equal(t, second.modules["grace"].tensors[key]), key


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_value_is_trained_on_the_codebook_the_runtime_will_serve(tok, kind):
    """A split shrinks a large ball the runtime's hook applies: while training, the
    editor must see the module's own output wherever the shrunk ball no longer
    reaches, so the probability it reports is the one the committed version serves."""
    rt = ModelRuntime(tiny_model(kind))
    # at layer 1 (not the last), so that other positions' outputs reach the target's
    big = {"eps_init": 50.0, "layers": [1]}
    edit(rt, tok, REQUESTS[:1], 1, **big)  # a ball over almost every position
    delta = grace_delta(rt, tok, REQUESTS[1:2], **big)
    entry = delta.meta["entries"][0]
    assert entry["action"] == "split" and entry["radius"] < 50.0
    rt.commit(rt.stage(delta), 2)
    (served,) = target_logprobs(rt.model, tok, [REQUESTS[1].text], [REQUESTS[1].target_new])
    assert float(torch.tensor(served).exp()) == pytest.approx(entry["target_prob"], abs=1e-4)
