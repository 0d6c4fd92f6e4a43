"""Data types shared by every editing method: requests, weight deltas, context.

A :class:`WeightDelta` is what an editor returns. It never touches the model: the
runtime (``workers/runtime.py``) applies, replays and reverts deltas, always by
rebuilding a parameter from its pristine value plus the ordered deltas (never by
subtracting, which is not exact in floating point).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DELTA_FORMAT_VERSION = 1
# format 2 = format 1 plus factored aux state (``auxk.*`` tensors): written only by a
# delta that has some, so that a reader that knows only format 1 refuses it instead
# of silently dropping the state; every other delta keeps format 1 and its bytes
DELTA_FORMAT_AUX_FACTORS = 2
# format 3 = format 2 plus ``values`` updates (a parameter set, not added to): written
# only by a delta that has some (an imported patch)
DELTA_FORMAT_VALUES = 3


@dataclass(frozen=True)
class EditRequest:
    """One fact correction: ``prompt.format(subject)`` should continue with ``target_new``.

    ``prompt`` holds exactly one ``{}`` where the subject goes. Targets carry no
    leading space; the methods and the metrics prepend one.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    # targets that must not win after the edit, each with the highest mean per-token
    # log-probability it may keep after the prompt: the target of the edit this one
    # supersedes, at its value before that edit (docs/editing.md, "Supersede")
    suppress: tuple[tuple[str, float], ...] = ()

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass
class LowRankUpdate:
    """ΔW = left @ rightᵀ, in the parameter's own layout.

    ``left`` is ``[param.shape[0], r]`` and ``right`` is ``[param.shape[1], r]``, so a
    GPT-2 Conv1D weight (stored ``[d_in, d_out]``) gets ``left`` over d_in rows.
    """

    param: str
    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return low_rank_dense(self.left, self.right)


@dataclass
class DenseUpdate:
    """ΔW given in full (fine-tuning)."""

    param: str
    delta: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.delta.to(torch.float32)


@dataclass
class ValuesUpdate:
    """The parameter's fp32 sum *becomes* ``value`` (not added to): an imported patch
    (docs/exports.md), whose tensors are the exporting deployment's results. A delta
    applies its values updates before its additive ones."""

    param: str
    value: torch.Tensor


Update = LowRankUpdate | DenseUpdate | ValuesUpdate


@dataclass
class ModuleState:
    """Non-additive method state of one adaptor on one module (GRACE's codebook).

    ``module`` is the path of the module whose forward the adaptor changes (e.g.
    ``model.layers.25.mlp.down_proj``); ``tensors`` are the adaptor's named tensors
    (GRACE: ``keys [m, d_in]``, ``values [m, d_out]``, ``radii [m]``, ``labels [m, T]``).
    A delta that carries a module state *sets* it: a version's state is the one set
    by the latest delta on its chain that sets it (replace, not add), so replay and
    rollback reproduce it exactly. The runtime installs the adaptor named by the
    state's key in ``WeightDelta.modules`` (``workers/editing/registry.py:ADAPTORS``).
    """

    module: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def is_finite(self) -> bool:
        return all(
            bool(torch.isfinite(t).all()) for t in self.tensors.values() if t.is_floating_point()
        )


def low_rank_dense(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ rightᵀ computed in a fixed order, so that the result is bit-identical
    whatever the thread count or BLAS: a sum of rank-one outer products, accumulated
    in float64 one after the other, then rounded once to float32.

    Element (i, j) is Σ_k left[i,k]·right[j,k] summed k = 0, 1, … — every element is
    computed independently of the others, so parallel kernels cannot reorder it.
    """
    left64 = left.detach().to(torch.float64)
    right64 = right.detach().to(torch.float64)
    out = torch.zeros(left64.shape[0], right64.shape[0], dtype=torch.float64, device=left.device)
    for k in range(left64.shape[1]):
        out.add_(torch.outer(left64[:, k], right64[:, k]))
    return out.to(torch.float32)


@dataclass
class WeightDelta:
    """The change one edit (or one batch of edits) makes to a model.

    ``updates`` are applied in order; two updates may name the same parameter.
    ``aux`` holds additive method state that is part of the model's version, given
    dense; ``aux_factors`` holds such state in factored form: ``name → K [d, r]``
    adds K Kᵀ (``d × d``) to the state ``name`` — AlphaEdit's accumulated keys, stored
    as the batch's keys instead of a dense d × d matrix per version. ``modules``
    holds non-additive adaptor state by adaptor name (:class:`ModuleState`, e.g.
    ``"grace"``: the whole codebook after this delta). ``meta`` is JSON-serialisable
    bookkeeping (method, layers, optimisation losses, timings).
    """

    method: str
    updates: list[Update] = field(default_factory=list)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, ModuleState] = field(default_factory=dict)
    aux_factors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        seen: dict[str, None] = {}
        for u in self.updates:
            seen.setdefault(u.param, None)
        return list(seen)

    def dense(self) -> dict[str, torch.Tensor]:
        """Parameter name → fp32 ΔW of the additive updates (summed when several share
        a parameter); :meth:`values` has the parameters the delta sets."""
        out: dict[str, torch.Tensor] = {}
        for u in self.updates:
            if isinstance(u, ValuesUpdate):
                continue
            d = u.dense()
            out[u.param] = d if u.param not in out else out[u.param] + d
        return out

    def values(self) -> dict[str, torch.Tensor]:
        """Parameter name → the fp32 value a :class:`ValuesUpdate` sets (the last one
        wins)."""
        return {
            u.param: u.value.to(torch.float32) for u in self.updates if isinstance(u, ValuesUpdate)
        }

    def aux_increments(self) -> list[tuple[str, torch.Tensor]]:
        """The additive state this delta adds, as fp32 ``(name, tensor)`` pairs in a
        fixed order: ``aux`` first, then each factor densified by :func:`low_rank_dense`
        (K Kᵀ, bit-identical whatever the thread count)."""
        out = [(name, t.detach().to(torch.float32)) for name, t in self.aux.items()]
        for name, k in self.aux_factors.items():
            k32 = k.detach().to(torch.float32)
            out.append((name, low_rank_dense(k32, k32)))
        return out

    def is_finite(self) -> bool:
        tensors: list[torch.Tensor] = [*self.aux.values(), *self.aux_factors.values()]
        for u in self.updates:
            if isinstance(u, LowRankUpdate):
                tensors += [u.left, u.right]
            else:
                tensors.append(u.value if isinstance(u, ValuesUpdate) else u.delta)
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        return finite and all(m.is_finite() for m in self.modules.values())

    def norm(self) -> float:
        """Frobenius norm of the whole update (all parameters together)."""
        total = 0.0
        for d in [*self.dense().values(), *self.values().values()]:
            total += float(d.double().pow(2).sum())
        return total**0.5

    # -- serialisation -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """One safetensors blob: tensors plus a JSON header describing the updates."""
        tensors: dict[str, torch.Tensor] = {}
        layout: list[dict[str, Any]] = []
        for i, u in enumerate(self.updates):
            if isinstance(u, LowRankUpdate):
                tensors[f"u{i}.left"] = u.left.detach().to(torch.float32).contiguous().cpu()
                tensors[f"u{i}.right"] = u.right.detach().to(torch.float32).contiguous().cpu()
                layout.append({"kind": "low_rank", "param": u.param})
            elif isinstance(u, ValuesUpdate):
                tensors[f"u{i}.values"] = u.value.detach().to(torch.float32).contiguous().cpu()
                layout.append({"kind": "values", "param": u.param})
            else:
                tensors[f"u{i}.delta"] = u.delta.detach().to(torch.float32).contiguous().cpu()
                layout.append({"kind": "dense", "param": u.param})
        for name, t in self.aux.items():
            tensors[f"aux.{name}"] = t.detach().to(torch.float32).contiguous().cpu()
        # module states keep their dtypes (GRACE's labels are token ids)
        modules: dict[str, dict[str, Any]] = {}
        for name, state in self.modules.items():
            _check_state_name(name)
            modules[name] = {"module": state.module, "tensors": sorted(state.tensors)}
            for key, t in state.tensors.items():
                tensors[f"mod.{name}.{key}"] = t.detach().contiguous().cpu()
        for name, t in self.aux_factors.items():
            tensors[f"auxk.{name}"] = t.detach().to(torch.float32).contiguous().cpu()
        # one metadata key holding sorted JSON: safetensors does not keep the order
        # of several keys, and the blob's bytes (its sha256 names the file) must
        # not depend on it
        fmt = DELTA_FORMAT_AUX_FACTORS if self.aux_factors else DELTA_FORMAT_VERSION
        if any(isinstance(u, ValuesUpdate) for u in self.updates):
            fmt = DELTA_FORMAT_VALUES
        header = {
            "format": fmt,
            "method": self.method,
            "updates": layout,
            "meta": self.meta,
        }
        if modules:  # absent otherwise: deltas without module state keep their bytes
            header["modules"] = modules
        metadata = {"memedit": json.dumps(header, sort_keys=True, default=str)}
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, blob: bytes) -> WeightDelta:
        tensors = st_load(blob)
        # safetensors.torch.load drops the metadata; read it from the header
        # (8-byte little-endian length, then JSON), as the format specifies.
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        header = json.loads(metadata.get("memedit", "{}"))
        known = (DELTA_FORMAT_VERSION, DELTA_FORMAT_AUX_FACTORS, DELTA_FORMAT_VALUES)
        if header.get("format") not in known:
            raise ValueError(f"unsupported delta format {header.get('format')!r}")
        updates: list[Update] = []
        for i, entry in enumerate(header["updates"]):
            if entry["kind"] == "low_rank":
                updates.append(
                    LowRankUpdate(entry["param"], tensors[f"u{i}.left"], tensors[f"u{i}.right"])
                )
            elif entry["kind"] == "values":
                updates.append(ValuesUpdate(entry["param"], tensors[f"u{i}.values"]))
            else:
                updates.append(DenseUpdate(entry["param"], tensors[f"u{i}.delta"]))
        aux = {k[4:]: v for k, v in tensors.items() if k.startswith("aux.")}
        modules = {
            name: ModuleState(
                module=entry["module"],
                tensors={key: tensors[f"mod.{name}.{key}"] for key in entry["tensors"]},
            )
            for name, entry in (header.get("modules") or {}).items()
        }
        factors = {k[5:]: v for k, v in tensors.items() if k.startswith("auxk.")}
        return cls(
            method=header["method"],
            updates=updates,
            aux=aux,
            meta=header["meta"],
            modules=modules,
            aux_factors=factors,
        )

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


@dataclass
class EditContext:
    """What an editor may use besides the model: device, cached artifacts, progress.

    ``cache`` is keyed by the caller (statistics, inverses, context templates) and
    lives as long as the worker's model does. ``stats_provider(layer_param) -> C``
    returns the uncentred second moment E[k kᵀ] of that layer's input keys, computing
    and caching it on first use. ``progress(fraction, message)`` reports progress.
    ``templates_provider`` gives the context templates (a worker's: the base model's).
    ``state`` is the method state of the model's current version: the chain's summed
    ``WeightDelta.aux`` tensors by name (e.g. AlphaEdit's accumulated K Kᵀ; an editor
    returns only its own increment in ``aux``) and the current :class:`ModuleState`
    of each adaptor by its name (e.g. ``"grace"``; an editor returns the whole new
    state in ``modules``).
    """

    device: torch.device | str = "cpu"
    cache: dict[str, Any] = field(default_factory=dict)
    stats_provider: Callable[[str], torch.Tensor] | None = None
    state: Mapping[str, torch.Tensor | ModuleState] = field(default_factory=dict)
    progress: Callable[[float, str], None] = lambda fraction, message: None
    seed: int = 0
    # (context_template_length_params as ((length, count), ...), seed) -> templates;
    # None: sampled from the model as it is (workers/editing/common/templates.py)
    templates_provider: Callable[[tuple[tuple[int, int], ...], int], list[str]] | None = None

    def second_moment(self, param: str) -> torch.Tensor:
        if self.stats_provider is None:
            raise RuntimeError(
                f"this edit needs the second-moment statistics of {param}, "
                "but no statistics provider was configured"
            )
        return self.stats_provider(param)


def _check_state_name(name: str) -> None:
    """Module state names become tensor-name prefixes (``mod.<name>.<tensor>``,
    ``state:<name>.<tensor>``): no dots, no colons."""
    if not name or "." in name or ":" in name:
        raise ValueError(f"module state name {name!r} must be non-empty, without '.' or ':'")


def requests_from_dicts(items: Sequence[Mapping[str, Any]]) -> list[EditRequest]:
    return [
        EditRequest(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=d["target_new"],
            target_true=d.get("target_true"),
            paraphrase_prompts=tuple(d.get("paraphrase_prompts") or ()),
            neighborhood_prompts=tuple(d.get("neighborhood_prompts") or ()),
        )
        for d in items
    ]
