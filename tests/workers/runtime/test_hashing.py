"""Tensor hashes (workers/runtime/hashing.py) and the parameters the runtime hashes."""

from __future__ import annotations

from pathlib import Path

import torch

from service.artifacts import ArtifactStore
from tests.workers.runtime.history import (
    build_history,
    tiny_model,
)
from workers.editing.types import (
    LowRankUpdate,
    WeightDelta,
)
from workers.runtime import (
    ModelRuntime,
    tensor_sha256,
)


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
