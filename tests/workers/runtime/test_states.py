"""Method state carried with the weights (workers/runtime/states.py): hashed per version,
factored states (AlphaEdit's accumulated keys) replayed bit-exactly and rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.artifacts import ArtifactStore
from tests import tiny_models
from tests.workers.runtime.history import (
    build_history,
    factored_history,
    tiny_model,
)
from workers.editing.common.stats import StatsCache, stats_provider
from workers.editing.hparams import defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import (
    EditContext,
    EditRequest,
    WeightDelta,
)
from workers.models.profiles import profile_for
from workers.runtime import (
    IntegrityError,
    ModelRuntime,
    VersionRecord,
)


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
