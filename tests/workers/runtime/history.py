"""Tiny random models and version histories for the runtime tests: random deltas
committed as versions, with every parameter's hash at each version."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from service.artifacts import ArtifactStore
from workers.editing.types import (
    DenseUpdate,
    LowRankUpdate,
    WeightDelta,
)
from workers.models.profiles import profile_for
from workers.runtime import (
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
