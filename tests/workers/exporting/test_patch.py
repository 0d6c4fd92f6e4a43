"""Patches (workers/exporting/patch.py) on tiny random models: a version's patch
applied onto a fresh copy of the base reproduces every tensor hash of the version,
in fp32 and bf16, with both encodings; the wrong base, a tampered patch and adaptor
state are refused; an imported patch (values updates) replays exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactStore
from tests.workers.runtime.history import (
    ARCHS,
    History,
    all_hashes,
    build_history,
    random_delta,
    tiny_model,
)
from workers.editing.types import DenseUpdate, ValuesUpdate, WeightDelta
from workers.exporting import patch as patches
from workers.models.profiles import profile_for
from workers.runtime import ModelRuntime, VersionRecord

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def make_patch(h: History, version: int) -> patches.Patch:
    """The patch of ``version`` (the runtime is synced to it first)."""
    rt = h.runtime
    rt.sync(h.records, version, h.store)
    return patches.build_patch(
        [h.deltas[n] for n in range(1, version + 1)],
        pristine=rt.pristine,
        current=lambda name: rt.param(name).detach(),
        canonical=rt.canonical,
        expected_sha256=h.records[version].tensor_sha256,
        manifest={"model": "tiny", "version": version},
    )


def add_version(h: History, delta: WeightDelta) -> int:
    """Commit ``delta`` on the head as the next version; its number."""
    v = max(h.records) + 1
    h.runtime.sync(h.records, v - 1, h.store)
    staged = h.runtime.stage(delta)
    art = h.store.put("delta", delta.to_bytes())
    h.records[v] = VersionRecord(v, "edit", v - 1, art.path, art.sha256,
                                 tensor_sha256=staged.tensor_sha256)  # fmt: skip
    h.runtime.commit(staged, v)
    h.full[v], h.deltas[v] = all_hashes(h.runtime.model), delta
    return v


def dense_delta(model: torch.nn.Module) -> WeightDelta:
    """A full-rank update of layer 1's MLP output (as fine-tuning makes)."""
    name = profile_for(model).mlp_out_param(1)
    gen = torch.Generator().manual_seed(5)
    shape = model.get_parameter(name).shape
    return WeightDelta(method="ft", updates=[DenseUpdate(name, torch.randn(*shape, generator=gen) * 1e-3)])  # fmt: skip


@ARCHS
@DTYPES
def test_a_patch_onto_a_fresh_base_gives_every_hash_of_the_version(
    arch: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    h = build_history(arch, ArtifactStore(tmp_path / "store"), n=8, dtype=dtype)
    add_version(h, dense_delta(h.runtime.model))
    for version in (3, 9):
        patch = make_patch(h, version)
        patch.write(tmp_path / f"v{version}")
        read = patches.read_patch(tmp_path / f"v{version}")
        fresh = tiny_model(arch, dtype=dtype)
        hashes = patches.apply_to_model(read, fresh)
        assert all_hashes(fresh) == h.full[version]  # touched or not, every tensor
        assert hashes == {n: h.records[version].tensor_sha256[n] for n in read.entries}
    encodings = {e["encoding"] for e in read.entries.values()}
    # the rank-≤3 updates travel as factors; the tensor that also took a dense
    # (fine-tuning) update travels as its values
    assert encodings == {"low_rank", "values"}, read.entries
    for name, e in read.entries.items():
        if e["encoding"] == "low_rank":
            size = sum(t.numel() * 4 for k, t in read.tensors.items() if k.startswith(f"{name}/"))
            assert size < fresh.get_parameter(name).numel() * fresh.get_parameter(name).element_size()  # fmt: skip


@ARCHS
def test_another_base_is_refused_and_left_as_it_was(arch: str, tmp_path: Path) -> None:
    h = build_history(arch, ArtifactStore(tmp_path), n=4)
    patch = make_patch(h, 4)
    other = tiny_model(arch, seed=1)
    before = all_hashes(other)
    with pytest.raises(patches.BaseMismatch, match="not the one the patch was made against") as err:
        patches.apply_to_model(patch, other)
    assert set(err.value.mismatched) == set(patch.entries)
    assert all_hashes(other) == before


def test_a_tampered_patch_is_refused(tmp_path: Path) -> None:
    h = build_history("llama", ArtifactStore(tmp_path), n=4)
    patch = make_patch(h, 4)
    key = next(k for k in patch.tensors if k.endswith(".left"))
    patch.tensors[key] = patch.tensors[key] * 1.0001
    fresh = tiny_model("llama")
    before = all_hashes(fresh)
    with pytest.raises(patches.PatchError, match="does not give the recorded tensor"):
        patches.apply_to_model(patch, fresh)
    assert all_hashes(fresh) == before
    del patch.tensors[key]
    patch.write(tmp_path / "p")
    with pytest.raises(patches.PatchError, match="lacks factor"):
        patches.read_patch(tmp_path / "p")
    with pytest.raises(patches.PatchError, match="not a memedit patch"):
        patches.read_patch(tmp_path / "nothing-here")


def test_a_version_with_adaptor_state_is_refused(tmp_path: Path) -> None:
    h = build_history("llama", ArtifactStore(tmp_path), n=2)
    rt = h.runtime
    hooked = WeightDelta(method="grace", updates=[], modules={"codebook": object()})  # type: ignore[dict-item]
    with pytest.raises(patches.PatchError, match="adaptor state"):
        patches.build_patch([h.deltas[1], hooked], pristine=rt.pristine,
                            current=lambda n: rt.param(n).detach(), canonical=rt.canonical,
                            expected_sha256={}, manifest={})  # fmt: skip


@DTYPES
def test_an_imported_patch_replays_and_edits_on_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    """What an import job does: the patch's fp32 sums set onto a fresh base as one
    version; replayed from its artifact it gives the same hashes, and a further edit
    on it gives the same bits as on the exporting runtime (the fp32 sums are equal)."""
    store = ArtifactStore(tmp_path)
    h = build_history("llama", store, n=6, dtype=dtype)
    patch = make_patch(h, 6)
    rt = ModelRuntime(tiny_model("llama", dtype=dtype))
    records = {0: VersionRecord(0, "base", tensor_sha256=rt.base_hashes())}
    rt.sync(records, 0, store)
    sums = patches.accumulators(patch, {n: rt.pristine(n) for n in patch.entries})
    delta = WeightDelta(method="import", updates=[ValuesUpdate(n, v) for n, v in sums.items()])
    staged = rt.stage(delta)
    assert all_hashes(rt.model) == h.full[6]
    art = store.put("delta", delta.to_bytes())
    records[1] = VersionRecord(1, "import", 0, art.path, art.sha256,
                               tensor_sha256=staged.tensor_sha256)  # fmt: skip
    rt.commit(staged, 1)
    again = ModelRuntime(tiny_model("llama", dtype=dtype))
    again.sync(records, 1, store)
    assert all_hashes(again.model) == h.full[6]
    nxt = random_delta(rt.model, torch.Generator().manual_seed(7))
    rt.commit(rt.stage(nxt), 2)
    h.runtime.commit(h.runtime.stage(nxt), 7)
    assert all_hashes(rt.model) == all_hashes(h.runtime.model)
    # back to the base and forward again, from the artifacts
    again.sync(records, 0, store)
    assert all_hashes(again.model) == h.full[0]
    again.sync(records, 1, store)
    assert all_hashes(again.model) == h.full[6]
