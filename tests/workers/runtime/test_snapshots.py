"""Snapshots of the runtime (workers/runtime/snapshots.py, taken and read by ModelRuntime):
replay starts from the nearest one, and one of another version is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactStore
from tests.workers.runtime.history import (
    ARCHS,
    CountingStore,
    all_hashes,
    build_history,
    random_delta,
    tiny_model,
)
from workers.runtime import (
    IntegrityError,
    ModelRuntime,
    VersionRecord,
)


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


def test_snapshot_of_a_pending_stage_equals_the_committed_snapshot(tmp_path: Path) -> None:
    h = build_history("gpt2", ArtifactStore(tmp_path), n=2)
    staged = h.runtime.stage(random_delta(h.runtime.model, torch.Generator().manual_seed(8)))
    assert staged.number == 3
    pending = staged.snapshot_bytes()
    h.runtime.commit(staged, 3)
    assert h.runtime.snapshot_bytes() == pending
    with pytest.raises(RuntimeError, match="no longer pending"):
        staged.snapshot_bytes()


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
