"""ModelRuntime on tiny random models: exact stage/discard, replay, rollback, snapshots."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from tests import tiny_models
from workers.artifacts import ArtifactCorrupt, ArtifactStore
from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.hparams import defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import (
    DenseUpdate,
    EditContext,
    EditRequest,
    LowRankUpdate,
    WeightDelta,
)
from workers.models.profiles import profile_for
from workers.runtime import (
    ChainError,
    IntegrityError,
    ModelRuntime,
    VersionRecord,
    tensor_sha256,
)

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    model.to(dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def all_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: tensor_sha256(p) for n, p in model.named_parameters()}


def random_delta(model: torch.nn.Module, gen: torch.Generator, *, aux: bool = False) -> WeightDelta:
    """A low-rank update of 1–2 random MLP output layers (sometimes a dense one too)."""
    profile = profile_for(model)
    n_layers = int(model.config.num_hidden_layers)
    layers = torch.randperm(n_layers, generator=gen)[
        : int(torch.randint(1, 3, (1,), generator=gen))
    ]
    updates: list[LowRankUpdate | DenseUpdate] = []
    for layer in layers.tolist():
        name = profile.mlp_out_param(layer)
        shape = model.get_parameter(name).shape
        r = int(torch.randint(1, 4, (1,), generator=gen))
        left = torch.randn(shape[0], r, generator=gen) * 0.05
        right = torch.randn(shape[1], r, generator=gen) * 0.05
        updates.append(LowRankUpdate(name, left, right))
    if int(torch.randint(0, 3, (1,), generator=gen)) == 0:
        name = profile.mlp_out_param(0)
        shape = model.get_parameter(name).shape
        updates.append(DenseUpdate(name, torch.randn(*shape, generator=gen) * 1e-3))
    extra = {"kkt": torch.randn(8, 8, generator=gen)} if aux else {}
    return WeightDelta(method="test", updates=updates, aux=extra)


@dataclasses.dataclass
class History:
    runtime: ModelRuntime
    store: ArtifactStore
    records: dict[int, VersionRecord]
    full: dict[int, dict[str, str]]  # version -> hash of every parameter
    deltas: dict[int, WeightDelta]


def build_history(
    arch: str, store: ArtifactStore, n: int = 10, dtype: torch.dtype = torch.float32
) -> History:
    model = tiny_model(arch, dtype=dtype)
    rt = ModelRuntime(model)
    records = {0: VersionRecord(0, "base", tensor_sha256=rt.base_hashes())}
    full = {0: all_hashes(model)}
    gen = torch.Generator().manual_seed(1)
    deltas = {}
    for v in range(1, n + 1):
        delta = random_delta(model, gen, aux=True)
        staged = rt.stage(delta)
        art = store.put("delta", delta.to_bytes())
        records[v] = VersionRecord(
            v, "edit", v - 1, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
        )
        rt.commit(staged, v)
        full[v] = all_hashes(model)
        deltas[v] = delta
    return History(rt, store, records, full, deltas)


class CountingStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, path: str, sha256: str | None = None) -> bytes:
        self.reads.append(path)
        return super().get(path, sha256)


ARCHS = pytest.mark.parametrize("arch", ["gpt2", "llama"])


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


@ARCHS
def test_snapshot_replays_only_the_deltas_after_it(arch: str, tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    h = build_history(arch, store, n=5)
    snap = store.put("snapshot", h.runtime.snapshot_bytes())
    h.records[5] = dataclasses.replace(
        h.records[5], snapshot_path=snap.path, snapshot_sha256=snap.sha256
    )
    gen = torch.Generator().manual_seed(7)
    for v in range(6, 9):
        delta = random_delta(h.runtime.model, gen, aux=True)
        staged = h.runtime.stage(delta)
        art = store.put("delta", delta.to_bytes())
        h.records[v] = VersionRecord(
            v, "edit", v - 1, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
        )
        h.runtime.commit(staged, v)
    expected = all_hashes(h.runtime.model)

    store.reads.clear()
    fresh = ModelRuntime(tiny_model(arch))
    report = fresh.sync(h.records, 8, store)
    assert (report.start, report.start_number, report.replayed) == ("snapshot", 5, (6, 7, 8))
    assert store.reads == [snap.path] + [h.records[v].delta_path for v in (6, 7, 8)]
    assert all_hashes(fresh.model) == expected
    assert torch.equal(fresh.aux["kkt"], h.runtime.aux["kkt"])

    # the same version rebuilt from the base (no snapshot on record) is identical
    no_snapshot = {**h.records, 5: dataclasses.replace(h.records[5], snapshot_path=None)}
    store.reads.clear()
    from_base = ModelRuntime(tiny_model(arch))
    report = from_base.sync(no_snapshot, 8, store)
    assert report.replayed == tuple(range(1, 9))
    assert len(store.reads) == 8
    assert all_hashes(from_base.model) == expected

    # versions below the snapshot are still reached from the base
    store.reads.clear()
    fresh.sync(h.records, 3, store)
    assert all_hashes(fresh.model) == h.full[3]


def test_snapshot_of_another_version_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    h = build_history("llama", store, n=4)
    h.runtime.sync(h.records, 3, store)
    snap = store.put("snapshot", h.runtime.snapshot_bytes())  # version 3's state
    records = {
        **h.records,
        4: dataclasses.replace(h.records[4], snapshot_path=snap.path, snapshot_sha256=snap.sha256),
    }
    fresh = ModelRuntime(tiny_model("llama"))
    with pytest.raises(IntegrityError, match="snapshot"):
        fresh.sync(records, 4, store)
    assert all_hashes(fresh.model) == h.full[0]


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


def test_snapshot_of_a_pending_stage_equals_the_committed_snapshot(tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=2)
    staged = h.runtime.stage(random_delta(h.runtime.model, torch.Generator().manual_seed(8)))
    assert staged.number == 3
    pending = staged.snapshot_bytes()
    h.runtime.commit(staged, 3)
    assert h.runtime.snapshot_bytes() == pending
    with pytest.raises(RuntimeError, match="no longer pending"):
        staged.snapshot_bytes()


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


def test_tied_parameters_are_tracked_once() -> None:
    rt = ModelRuntime(tiny_model("gpt2"))  # lm_head.weight is transformer.wte.weight
    shape = rt.model.get_parameter("transformer.wte.weight").shape
    delta = WeightDelta(
        "t", [LowRankUpdate("lm_head.weight", torch.ones(shape[0], 1), torch.ones(shape[1], 1))]
    )
    staged = rt.stage(delta)
    assert staged.params == ("transformer.wte.weight",)
    assert rt.touched_params == {"transformer.wte.weight"}
    rt.discard(staged)
    assert rt.touched_params == frozenset()


def test_tensor_sha256_covers_dtype_shape_and_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32)
    assert tensor_sha256(t) == tensor_sha256(t.clone())
    assert tensor_sha256(t) != tensor_sha256(t.reshape(2, 3))
    assert tensor_sha256(t) != tensor_sha256(t.to(torch.float64))
    assert tensor_sha256(t.to(torch.bfloat16)) != tensor_sha256(t.to(torch.float16))
    u = t.clone()
    u[5] = torch.nextafter(u[5], torch.tensor(10.0))
    assert tensor_sha256(t) != tensor_sha256(u)
    # non-contiguous views hash as their values
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_sha256(m.t()) == tensor_sha256(m.t().contiguous())


def test_base_hashes_cover_every_parameter_even_after_edits(tmp_path: Path) -> None:
    h = build_history("llama", ArtifactStore(tmp_path), n=2)
    assert h.runtime.base_hashes() == h.full[0]
    late = ModelRuntime(tiny_model("llama"))
    late.sync(h.records, 2, h.store)
    assert late.base_hashes() == h.full[0]  # computed after the edits, from the pristine copies


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


def test_snapshot_taken_for_a_rollback_version(tmp_path: Path) -> None:
    """A rollback's state is its target's: a snapshot taken right after syncing to the
    target, stored with the rollback version, serves later rebuilds."""
    h = build_history("llama", ArtifactStore(tmp_path), n=6)
    rt = h.runtime
    touched = rt.touched_params
    rt.sync(h.records, 3, h.store)
    snap = h.store.put("snapshot", rt.snapshot_bytes())  # header: version 3
    h.records[7] = VersionRecord(
        7,
        "rollback",
        parent_number=3,
        snapshot_path=snap.path,
        snapshot_sha256=snap.sha256,
        tensor_sha256=rt.tensor_hashes(sorted(touched | rt.touched_params)),
    )
    rt.current_version = 7
    delta = random_delta(rt.model, torch.Generator().manual_seed(6), aux=True)
    staged = rt.stage(delta)
    art = h.store.put("delta", delta.to_bytes())
    h.records[8] = VersionRecord(
        8, "edit", 7, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
    )
    rt.commit(staged, 8)
    expected = all_hashes(rt.model)
    fresh = ModelRuntime(tiny_model("llama"))
    report = fresh.sync(h.records, 8, h.store)
    assert (report.start, report.start_number, report.replayed) == ("snapshot", 7, (8,))
    assert all_hashes(fresh.model) == expected
    # but a snapshot of version 3 is not one of version 6 (an edit)
    bad = {
        **h.records,
        6: dataclasses.replace(h.records[6], snapshot_path=snap.path, snapshot_sha256=snap.sha256),
    }
    with pytest.raises(IntegrityError, match="is of version 3"):
        ModelRuntime(tiny_model("llama")).sync(bad, 6, h.store)


def test_hashes_of_method_state_absent_at_a_version(tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=2)  # every delta carries aux "kkt"
    rt = h.runtime
    assert "aux:kkt" in h.records[2].tensor_sha256
    rt.sync(h.records, 0, h.store)
    # a rollback to 0 records no hash for state that does not exist at 0
    assert rt.tensor_hashes(["aux:kkt", "transformer.h.0.mlp.c_proj.weight"]) == {
        "transformer.h.0.mlp.c_proj.weight": h.full[0]["transformer.h.0.mlp.c_proj.weight"]
    }
    # while a version that records it must have it
    wrong = {**h.records, 3: VersionRecord(3, "rollback", 0, tensor_sha256={"aux:kkt": "0" * 64})}
    with pytest.raises(IntegrityError, match="aux:kkt is missing"):
        rt.sync(wrong, 3, h.store)


# -- factored method state (AlphaEdit's accumulated keys) -------------------------------------


def factored_history(store: ArtifactStore, threads: int, n: int = 6) -> History:
    """Versions whose deltas carry their state as factors K (the state adds K Kᵀ), some
    with a dense aux of the same name too; built at ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_model("llama")
        rt = ModelRuntime(model)
        records = {0: VersionRecord(0, "base", tensor_sha256=rt.base_hashes())}
        gen = torch.Generator().manual_seed(3)
        full, deltas = {0: all_hashes(model)}, {}
        for v in range(1, n + 1):
            delta = random_delta(model, gen)
            delta.aux_factors = {
                "keys:a": torch.randn(48, int(torch.randint(1, 5, (1,), generator=gen)),
                                      generator=gen) * 3,
                "keys:b": torch.randn(40, 2, generator=gen),
            }  # fmt: skip
            if v % 2 == 0:
                delta.aux = {"keys:a": torch.randn(48, 48, generator=gen)}
            staged = rt.stage(delta)
            art = store.put("delta", delta.to_bytes())
            records[v] = VersionRecord(
                v, "edit", v - 1, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
            )
            rt.commit(staged, v)
            full[v], deltas[v] = all_hashes(model), delta
        return History(rt, store, records, full, deltas)
    finally:
        torch.set_num_threads(old)


def test_factored_state_replays_bit_exactly_whatever_the_thread_count(tmp_path: Path) -> None:
    h = factored_history(ArtifactStore(tmp_path), threads=1)
    assert {"aux:keys:a", "aux:keys:b"} <= set(h.records[6].tensor_sha256)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fresh = ModelRuntime(tiny_model("llama"))
        fresh.sync(h.records, 6, h.store)  # verifies every recorded hash, the state's too
    finally:
        torch.set_num_threads(old)
    for name in ("keys:a", "keys:b"):
        assert torch.equal(fresh.aux[name], h.runtime.aux[name])
    # the state is the sum of K Kᵀ (and the dense parts) over the chain
    want = sum(d.aux_factors["keys:b"].double() @ d.aux_factors["keys:b"].double().T
               for d in h.deltas.values())  # fmt: skip
    torch.testing.assert_close(fresh.aux["keys:b"].double(), want, rtol=1e-6, atol=1e-5)


def test_rollback_restores_the_factored_state_of_version_n(tmp_path: Path) -> None:
    h = factored_history(ArtifactStore(tmp_path), threads=1)
    rt = h.runtime
    for target in (3, 6, 1, 4):
        rt.sync(h.records, target, h.store)
        state = {k: v for k, v in rt.tensor_hashes().items() if k.startswith("aux:")}
        assert state == {k: v for k, v in h.records[target].tensor_sha256.items()
                         if k.startswith("aux:")}, target  # fmt: skip
    rt.sync(h.records, 0, h.store)
    assert rt.aux == {}


def test_factored_state_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    h = factored_history(ArtifactStore(tmp_path), threads=1, n=1)
    before = {k: v.clone() for k, v in h.runtime.aux.items()}
    for bad in (torch.randn(47, 2), torch.randn(48)):
        with pytest.raises(ValueError, match="keys:a"):
            h.runtime.stage(WeightDelta(method="test", aux_factors={"keys:a": bad}))
    assert all(torch.equal(h.runtime.aux[k], before[k]) for k in before)


def test_alphaedit_versions_roll_back_to_version_n_state(tmp_path: Path) -> None:
    """Real AlphaEdit deltas, each computed on the runtime's current state: syncing
    back to version N gives N's weights and N's accumulated keys (hash-checked)."""
    tok, model = tiny_models.word_tokenizer(), tiny_models.tiny_model("llama")
    rt, store = ModelRuntime(model), ArtifactStore(tmp_path / "store")
    overrides = tiny_models.TINY_OVERRIDES["alphaedit"]
    hp = with_overrides(defaults_for("alphaedit", "llama", 4, 64), overrides)
    params = [profile_for(model).mlp_out_param(layer) for layer in hp.layers]
    provide = stats_provider(
        StatsCache(tmp_path / "stats", "t"), model, tok, params, "self", 64, 16
    )
    cache: dict = {}
    records = {0: VersionRecord(0, "base", tensor_sha256=rt.base_hashes())}
    batches = [
        [EditRequest("The native language of {}", "Picasso", "Russian")],
        [EditRequest("The capital city of {}", "Toyota", "Athens")],
        [EditRequest("The famous writer {}", "Tolstoy", "Einstein"),
         EditRequest("The famous actor {}", "Newton", "Moscow")],
    ]  # fmt: skip
    for v, requests in enumerate(batches, start=1):
        ctx = EditContext(cache=cache, stats_provider=provide, state=rt.aux)
        delta = get_editor("alphaedit").compute_delta(model, tok, requests, hp, ctx)
        assert delta.meta["prior_state"] == [v > 1] * len(params)
        staged = rt.stage(delta)
        art = store.put("delta", delta.to_bytes())
        records[v] = VersionRecord(
            v, "edit", v - 1, art.path, art.sha256, tensor_sha256=staged.tensor_sha256
        )
        rt.commit(staged, v)
    state_names = {"aux:alphaedit.kkt:" + p for p in params}
    assert state_names <= set(records[3].tensor_sha256)
    assert all(records[1].tensor_sha256[n] != records[3].tensor_sha256[n] for n in state_names)
    for target in (1, 3, 2, 0):
        rt.sync(records, target, store)  # raises IntegrityError on any hash difference
        assert rt.tensor_hashes(sorted(state_names)) == {
            n: records[target].tensor_sha256[n] for n in state_names if target > 0
        }
    fresh = ModelRuntime(tiny_models.tiny_model("llama"))
    fresh.sync(records, 2, store)
    assert fresh.tensor_hashes(sorted(state_names)) == {
        n: records[2].tensor_sha256[n] for n in state_names
    }
