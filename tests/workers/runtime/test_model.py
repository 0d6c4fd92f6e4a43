"""ModelRuntime (workers/runtime/model.py) on tiny random models: exact stage/discard,
replay, rollback, incremental sync, and the refusals that keep the weights intact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactCorrupt, ArtifactStore
from tests.workers.runtime.history import (
    ARCHS,
    all_hashes,
    build_history,
    random_delta,
    tiny_model,
)
from workers.editing.types import (
    DenseUpdate,
    LowRankUpdate,
    WeightDelta,
)
from workers.models.profiles import profile_for
from workers.runtime import (
    ChainError,
    IntegrityError,
    ModelRuntime,
    VersionRecord,
)


@ARCHS
def test_stage_then_discard_is_bit_exact(arch: str, tmp_path: Path) -> None:
    h = build_history(arch, ArtifactStore(tmp_path), n=3)
    before = all_hashes(h.runtime.model)
    aux_before = {k: v.clone() for k, v in h.runtime.aux.items()}
    touched_before = h.runtime.touched_params
    gen = torch.Generator().manual_seed(99)
    for _ in range(3):
        # touches both parameters already edited and fresh ones
        staged = h.runtime.stage(random_delta(h.runtime.model, gen, aux=True))
        assert all_hashes(h.runtime.model) != before
        h.runtime.discard(staged)
        assert all_hashes(h.runtime.model) == before
        assert h.runtime.touched_params == touched_before
        assert h.runtime.current_version == 3
        assert h.runtime.aux.keys() == aux_before.keys()
        assert all(torch.equal(h.runtime.aux[k], aux_before[k]) for k in aux_before)


@ARCHS
def test_replay_in_a_fresh_runtime_reproduces_every_hash(arch: str, tmp_path: Path) -> None:
    h = build_history(arch, ArtifactStore(tmp_path), n=10)
    fresh = ModelRuntime(tiny_model(arch))
    report = fresh.sync(h.records, 10, h.store)
    assert report.replayed == tuple(range(1, 11))
    assert report.start == "base"
    assert report.verified == len(h.records[10].tensor_sha256) > 0
    assert report.unverified == ()
    assert fresh.current_version == 10
    assert all_hashes(fresh.model) == h.full[10]
    assert fresh.touched_params == h.runtime.touched_params
    assert torch.equal(fresh.aux["kkt"], h.runtime.aux["kkt"])
    # the state really moved away from the base
    assert h.full[10] != h.full[0]


@ARCHS
def test_rollback_to_any_version_reproduces_its_hashes(arch: str, tmp_path: Path) -> None:
    h = build_history(arch, ArtifactStore(tmp_path), n=10)
    rt = h.runtime
    for target in [7, 3, 0, 9, 1, 10, 5]:
        rt.sync(h.records, target, h.store)
        assert rt.current_version == target
        assert all_hashes(rt.model) == h.full[target], target
    # version 0 leaves nothing touched: every parameter is pristine again
    rt.sync(h.records, 0, h.store)
    assert rt.touched_params == frozenset()
    assert rt.aux == {}


@ARCHS
def test_rollback_version_then_edit_on_top(arch: str, tmp_path: Path) -> None:
    """A rollback appends a version whose parent is the target; later edits chain on it."""
    h = build_history(arch, ArtifactStore(tmp_path), n=6)
    rt = h.runtime
    head_touched = rt.touched_params
    rt.sync(h.records, 2, h.store)
    hashes = rt.tensor_hashes(sorted(head_touched | rt.touched_params))
    h.records[7] = VersionRecord(7, "rollback", parent_number=2, tensor_sha256=hashes)
    report = rt.sync(h.records, 7, h.store)  # no replay: the current state is version 2
    assert report.start == "current" and report.replayed == ()
    assert all_hashes(rt.model) == h.full[2]

    delta = random_delta(rt.model, torch.Generator().manual_seed(5))
    staged = rt.stage(delta)
    art = h.store.put("delta", delta.to_bytes())
    h.records[8] = VersionRecord(
        8, "edit", 7, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
    )
    rt.commit(staged, 8)
    expected = all_hashes(rt.model)

    fresh = ModelRuntime(tiny_model(arch))
    report = fresh.sync(h.records, 8, h.store)
    assert report.replayed == (1, 2, 8)
    assert all_hashes(fresh.model) == expected
    fresh.sync(h.records, 7, h.store)
    assert all_hashes(fresh.model) == h.full[2]


def test_incremental_sync_replays_only_new_versions(tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=10)
    rt = ModelRuntime(tiny_model("gpt2"))
    rt.sync(h.records, 6, h.store)
    report = rt.sync(h.records, 10, h.store)
    assert (report.start, report.replayed) == ("current", (7, 8, 9, 10))
    assert all_hashes(rt.model) == h.full[10]
    report = rt.sync(h.records, 10, h.store, from_scratch=True)
    assert report.start == "base" and len(report.replayed) == 10
    assert all_hashes(rt.model) == h.full[10]


def test_corrupt_delta_artifact_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    h = build_history("gpt2", store, n=5)
    file = tmp_path / h.records[3].delta_path
    blob = bytearray(file.read_bytes())
    blob[-1] ^= 0x01
    file.write_bytes(bytes(blob))
    fresh = ModelRuntime(tiny_model("gpt2"))
    with pytest.raises(ArtifactCorrupt):
        fresh.sync(h.records, 5, store)
    assert fresh.current_version == 0
    assert all_hashes(fresh.model) == h.full[0]
    # versions before the corrupt one are still reachable
    fresh.sync(h.records, 2, store)
    assert all_hashes(fresh.model) == h.full[2]


def test_hash_mismatch_raises_and_keeps_the_previous_state(tmp_path: Path) -> None:
    h = build_history("llama", ArtifactStore(tmp_path), n=6)
    rt = ModelRuntime(tiny_model("llama"))
    rt.sync(h.records, 2, h.store)
    rec = h.records[5]
    name = sorted(rec.tensor_sha256)[0]
    bad = dict(h.records)
    bad[5] = dataclasses.replace(rec, tensor_sha256={**rec.tensor_sha256, name: "0" * 64})
    with pytest.raises(IntegrityError, match=name):
        rt.sync(bad, 5, h.store)
    assert rt.current_version == 2
    assert all_hashes(rt.model) == h.full[2]
    # a delta artifact that is intact but is not the one the hashes were recorded for
    swapped = dict(h.records)
    swapped[4] = dataclasses.replace(
        h.records[4], delta_path=h.records[3].delta_path, delta_sha256=h.records[3].delta_sha256
    )
    with pytest.raises(IntegrityError):
        rt.sync(swapped, 6, h.store, from_scratch=True)
    assert rt.current_version == 2
    assert all_hashes(rt.model) == h.full[2]


@pytest.mark.parametrize("where", ["left", "right", "dense", "aux", "overflow"])
def test_non_finite_delta_is_refused_before_touching_anything(where: str, tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=2)
    rt = h.runtime
    name = profile_for(rt.model).mlp_out_param(3)  # not touched yet: no pristine copy either
    shape = rt.model.get_parameter(name).shape
    left, right = torch.ones(shape[0], 1), torch.ones(shape[1], 1)
    updates: list[LowRankUpdate | DenseUpdate] = [LowRankUpdate(name, left, right)]
    aux = {}
    if where == "left":
        left[3, 0] = float("nan")
    elif where == "right":
        right[0, 0] = float("inf")
    elif where == "dense":
        updates.append(DenseUpdate(name, torch.full(tuple(shape), float("-inf"))))
    elif where == "aux":
        aux = {"kkt": torch.tensor([float("nan")])}
    else:  # finite factors whose product overflows fp32
        left.fill_(1e30)
        right.fill_(1e30)
    before = all_hashes(rt.model)
    with pytest.raises(ValueError, match="finite"):
        rt.stage(WeightDelta(method="test", updates=updates, aux=aux))
    assert all_hashes(rt.model) == before
    assert name not in rt.touched_params
    # and the runtime still works
    rt.discard(rt.stage(random_delta(rt.model, torch.Generator().manual_seed(3))))
    assert all_hashes(rt.model) == before


def test_delta_of_the_wrong_shape_or_parameter_is_refused(tmp_path: Path) -> None:
    rt = ModelRuntime(tiny_model("llama"))
    name = profile_for(rt.model).mlp_out_param(1)
    with pytest.raises(ValueError, match="shape"):
        rt.stage(WeightDelta("t", [LowRankUpdate(name, torch.ones(3, 1), torch.ones(5, 1))]))
    with pytest.raises(ValueError, match="no parameter"):
        rt.stage(WeightDelta("t", [DenseUpdate("model.nope.weight", torch.ones(2, 2))]))
    assert rt.touched_params == frozenset()


@pytest.mark.parametrize(
    ("arch", "layer_param"),
    [("gpt2", "transformer.h.{}.mlp.c_fc.weight"), ("llama", "model.layers.{}.mlp.up_proj.weight")],
)
def test_drift_matches_a_direct_computation(arch: str, layer_param: str) -> None:
    rt = ModelRuntime(tiny_model(arch))
    base = tiny_model(arch)  # same seed: the pristine weights
    gen = torch.Generator().manual_seed(11)
    names = [layer_param.format(i) for i in (1, 2)]
    total = {n: torch.zeros_like(rt.model.get_parameter(n)) for n in names}
    for v in range(1, 4):
        updates = []
        for n in names:
            shape = rt.model.get_parameter(n).shape
            left = torch.randn(shape[0], 2, generator=gen)
            u = LowRankUpdate(n, left, torch.randn(shape[1], 2, generator=gen))
            updates.append(u)
            total[n] += u.dense()
        delta = WeightDelta("test", updates)
        staged = rt.stage(delta)
        assert staged.update_norm == pytest.approx(delta.norm(), rel=1e-9)
        rt.commit(staged, v)
        assert staged.drift == rt.drift().per_row
        assert staged.drift_relative == rt.drift().relative
    for n in names:
        w, w0 = rt.model.get_parameter(n), base.get_parameter(n)
        # d_out: a GPT-2 Conv1D weight is stored [d_in, d_out] = [32, 128]; Linear is [d_out, d_in]
        rows = 128 if arch == "gpt2" else 64
        assert rt.rows(n) == rows
        diff = float((w - w0).norm())
        assert rt.drift().per_row[n] == pytest.approx(diff / rows, rel=1e-5)
        assert rt.drift().relative[n] == pytest.approx(diff / float(w0.norm()), rel=1e-5)
        assert rt.drift().per_row[n] == pytest.approx(float(total[n].norm()) / rows, rel=1e-4)
    assert set(rt.drift().per_row) == set(names)


@ARCHS
def test_bf16_model_accumulates_in_fp32_and_casts_once(arch: str, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    h = build_history(arch, store, n=10, dtype=torch.bfloat16)
    rt = h.runtime
    # the served weights are exactly cast(W0 + Σ ΔW in fp32), for every touched parameter
    base = tiny_model(arch, dtype=torch.bfloat16)
    for name in rt.touched_params:
        acc = base.get_parameter(name).detach().float()
        for v in range(1, 11):
            d = h.deltas[v].dense().get(name)
            if d is not None:
                acc = acc + d
        assert torch.equal(rt.model.get_parameter(name), acc.to(torch.bfloat16)), name
    fresh = ModelRuntime(tiny_model(arch, dtype=torch.bfloat16))
    fresh.sync(h.records, 10, store)
    assert all_hashes(fresh.model) == h.full[10]
    fresh.sync(h.records, 4, store)
    assert all_hashes(fresh.model) == h.full[4]
    fresh.sync(h.records, 0, store)
    assert all_hashes(fresh.model) == h.full[0]
    staged = rt.stage(random_delta(rt.model, torch.Generator().manual_seed(2)))
    rt.discard(staged)
    assert all_hashes(rt.model) == h.full[10]


def test_chain_errors(tmp_path: Path) -> None:
    h = build_history("llama", ArtifactStore(tmp_path), n=3)
    rt = ModelRuntime(tiny_model("llama"))
    with pytest.raises(ChainError, match="not in the records"):
        rt.sync({k: v for k, v in h.records.items() if k != 2}, 3, h.store)
    with pytest.raises(ChainError, match="parent"):
        rt.sync({**h.records, 4: VersionRecord(4, "rollback", parent_number=None)}, 4, h.store)
    with pytest.raises(ChainError, match="no delta"):
        rt.sync({**h.records, 4: VersionRecord(4, "edit", 3)}, 4, h.store)
    assert rt.current_version == 0


def test_pending_stage_blocks_sync_snapshot_and_another_stage(tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=1)
    staged = h.runtime.stage(random_delta(h.runtime.model, torch.Generator().manual_seed(4)))
    for call in (
        lambda: h.runtime.sync(h.records, 0, h.store),
        h.runtime.snapshot_bytes,
        lambda: h.runtime.stage(h.deltas[1]),
    ):
        with pytest.raises(RuntimeError, match="pending"):
            call()
    h.runtime.commit(staged, 2)
    with pytest.raises(RuntimeError, match="pending stage"):
        h.runtime.discard(staged)


@ARCHS
def test_at_base_shows_the_base_and_restores_every_bit(arch: str, tmp_path: Path) -> None:
    """Inside ``at_base`` the model is version 0 (weights and method state); after it,
    the current version again, bit for bit, and it can still stage and commit."""
    h = build_history(arch, ArtifactStore(tmp_path), n=4)
    base = all_hashes(tiny_model(arch))
    current = all_hashes(h.runtime.model)
    aux = {k: v.clone() for k, v in h.runtime.aux.items()}
    assert current != base and aux
    with h.runtime.at_base():
        assert all_hashes(h.runtime.model) == base
        assert h.runtime.aux == {}
    assert all_hashes(h.runtime.model) == current
    assert h.runtime.tensor_hashes() == h.records[4].tensor_sha256
    assert all(torch.equal(h.runtime.aux[k], aux[k]) for k in aux)
    with pytest.raises(RuntimeError, match="boom"), h.runtime.at_base():
        raise RuntimeError("boom")  # restored on the way out of an error too
    assert all_hashes(h.runtime.model) == current
    staged = h.runtime.stage(random_delta(h.runtime.model, torch.Generator().manual_seed(5)))
    with pytest.raises(RuntimeError, match="staged"), h.runtime.at_base():
        pass
    h.runtime.discard(staged)
