"""A delta's updates as the runtime applies them: validated against the parameters
(shape, finiteness) and cast to fp32 on each parameter's device, exactly as
``WeightDelta.to_bytes`` stores them, so that staging and a later replay from the
artifact compute the same bits (workers/runtime/model.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from workers.editing.types import DenseUpdate, LowRankUpdate, Update, ValuesUpdate, WeightDelta


def additive(
    delta: WeightDelta, canonical: Callable[[str], str], params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Canonical name → fp32 ΔW of the delta's additive updates (summed per
    parameter); :func:`values` has what it sets."""
    updates: list[Update] = []
    for u in delta.updates:
        canon = canonical(u.param)
        dev = params[canon].device
        if isinstance(u, LowRankUpdate):
            updates.append(LowRankUpdate(canon, _f32(u.left, dev), _f32(u.right, dev)))
        elif isinstance(u, DenseUpdate):
            updates.append(DenseUpdate(canon, _f32(u.delta, dev)))
        elif not isinstance(u, ValuesUpdate):
            raise TypeError(f"unsupported update type {type(u).__name__}")
    dense = WeightDelta(method=delta.method, updates=updates).dense()
    for name, d in dense.items():
        shape = tuple(params[name].shape)
        if tuple(d.shape) != shape:
            raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, expected {shape}")
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"refusing a delta whose ΔW for {name} is not finite")
    return dense


def values(
    delta: WeightDelta, canonical: Callable[[str], str], params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Canonical name → the fp32 value each :class:`ValuesUpdate` of the delta sets."""
    out: dict[str, torch.Tensor] = {}
    for u in delta.updates:
        if not isinstance(u, ValuesUpdate):
            continue
        canon = canonical(u.param)
        p = params[canon]
        value = _f32(u.value, p.device)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"values for {canon} have shape {tuple(value.shape)}, expected {tuple(p.shape)}")  # fmt: skip
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"refusing values for {canon} that are not finite")
        out[canon] = value
    return out


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().to(device)
