"""A version as a patch against its base: the net change of every touched tensor,
exact, compact, and applicable with no service (``memedit apply-patch``).

A patch is a folder (or a tar of one) holding ``manifest.json`` and
``tensors.safetensors``. For each tensor that the version's chain changed, the
manifest records the sha256 of the base tensor it applies to and of the tensor it
produces (both in memedit's ``tensor_sha256`` form), and one of two encodings:

- ``low_rank``: the chain's updates of that tensor, in ledger order, as the factors
  the editors produced (``<name>/<g>.<u>.left|right``: update ``u`` of the ``g``-th
  delta that touched it). Applying replays them exactly as the worker's runtime does
  (``fp32(W_0)``, plus each delta's ``left · rightᵀ`` by ``low_rank_dense``, one fp32
  addition per delta, one cast at the end), so the result is the worker's tensor bit
  for bit. Chosen when the factors are smaller than the tensor.
- ``values``: the resulting tensor itself (``<name>/values``, in the model's dtype),
  when the history is not low rank (a fine-tuning delta, or more factors than the
  tensor has numbers). Exact by construction.

Method state that is not weights is not carried: a version with module state (a
GRACE codebook, which acts through a forward hook) is refused
(:class:`PatchError`), and additive editor state (AlphaEdit's accumulated keys,
which only shapes later edits) is left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from service.patch_manifest import FORMAT as PATCH_FORMAT
from service.patch_manifest import FORMAT_VERSION as PATCH_FORMAT_VERSION
from service.patch_manifest import MANIFEST
from workers.editing.types import LowRankUpdate, WeightDelta
from workers.runtime.hashing import tensor_sha256

TENSORS = "tensors.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PatchError(ValueError):
    """The version cannot be written as a patch, or a patch is not well formed."""


class BaseMismatch(PatchError):
    """The base a patch is applied to is not the one it was made against."""

    def __init__(self, mismatched: Sequence[str], missing: Sequence[str]) -> None:
        parts = []
        if missing:
            parts.append(f"it has no tensor {', '.join(missing[:3])}")
        if mismatched:
            parts.append(
                f"{len(mismatched)} tensor(s) differ from the patch's base, e.g. "
                + ", ".join(mismatched[:3])
            )
        super().__init__("this base is not the one the patch was made against: " + "; ".join(parts))
        self.mismatched = list(mismatched)
        self.missing = list(missing)


@dataclass
class Patch:
    """A patch in memory: the manifest and its tensors by key."""

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tensors"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write(self, folder: Path) -> list[str]:
        """``manifest.json`` and ``tensors.safetensors`` in ``folder``; the files."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(folder / TENSORS))
        (folder / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        return [MANIFEST, TENSORS]


def read_patch(folder: Path) -> Patch:
    """The patch in ``folder``; :class:`PatchError` if it is not one memedit wrote."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise PatchError(f"{folder} holds no {MANIFEST}: not a memedit patch") from None
    except json.JSONDecodeError as exc:
        raise PatchError(f"{MANIFEST} is not JSON: {exc}") from None
    if manifest.get("format") != PATCH_FORMAT:
        raise PatchError(f"{MANIFEST} is not a memedit patch manifest")
    if manifest.get("format_version") != PATCH_FORMAT_VERSION:
        raise PatchError(f"unsupported patch format version {manifest.get('format_version')!r}")
    tensors = load_file(str(folder / TENSORS)) if (folder / TENSORS).is_file() else {}
    patch = Patch(manifest=manifest, tensors=tensors)
    for name, entry in patch.entries.items():
        _check_entry(patch, name, entry)
    return patch


def _check_entry(patch: Patch, name: str, entry: Mapping[str, Any]) -> None:
    if entry.get("encoding") == "values":
        if f"{name}/values" not in patch.tensors:
            raise PatchError(f"the patch lacks the values of {name}")
    elif entry.get("encoding") == "low_rank":
        for g, count in enumerate(entry.get("groups") or []):
            for u in range(int(count)):
                for side in ("left", "right"):
                    if f"{name}/{g}.{u}.{side}" not in patch.tensors:
                        raise PatchError(f"the patch lacks factor {g}.{u}.{side} of {name}")
    else:
        raise PatchError(f"unknown encoding {entry.get('encoding')!r} of {name}")
    if entry.get("dtype") not in _DTYPES:
        raise PatchError(f"unsupported dtype {entry.get('dtype')!r} of {name}")


# -- building ----------------------------------------------------------------------------


def build_patch(
    deltas: Sequence[WeightDelta],
    *,
    pristine: Callable[[str], torch.Tensor],
    current: Callable[[str], torch.Tensor],
    canonical: Callable[[str], str],
    expected_sha256: Mapping[str, str],
    manifest: Mapping[str, Any],
) -> Patch:
    """The patch of the version whose chain has ``deltas`` (in ledger order).

    ``pristine(name)`` is the base tensor, ``current(name)`` the tensor at the
    version, ``canonical`` maps a delta's parameter name to the tracked one, and
    ``expected_sha256`` is the version's ledger hashes: the patch is applied onto
    the base before it is returned and must reproduce them (:class:`PatchError`
    otherwise). ``manifest`` is merged into the manifest (model, version, base,
    edits)."""
    for d in deltas:
        if d.modules:
            names = ", ".join(sorted(d.modules))
            raise PatchError(
                f"the version carries adaptor state ({names}) besides its weights, which "
                "neither a Hugging Face folder nor a patch holds; roll back past it or "
                "make those edits with a weight method"
            )
    history: dict[str, list[list[Any]]] = {}
    for d in deltas:
        per_delta: dict[str, list[Any]] = {}
        for u in d.updates:
            per_delta.setdefault(canonical(u.param), []).append(u)
        for name, updates in per_delta.items():
            history.setdefault(name, []).append(updates)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(history):
        base = pristine(name)
        value = current(name)
        entry: dict[str, Any] = {
            "shape": list(base.shape),
            "dtype": str(base.dtype).removeprefix("torch."),
            "base_sha256": tensor_sha256(base),
            "sha256": tensor_sha256(value),
        }
        groups = history[name]
        low_rank = all(isinstance(u, LowRankUpdate) for g in groups for u in g)
        rank = sum(int(u.left.shape[1]) for g in groups for u in g) if low_rank else 0
        factor_bytes = 4 * rank * sum(int(s) for s in base.shape[:2]) if low_rank else 0
        if low_rank and factor_bytes < base.numel() * base.element_size():
            entry.update(encoding="low_rank", rank=rank, groups=[len(g) for g in groups])
            for gi, group in enumerate(groups):
                for ui, u in enumerate(group):
                    tensors[f"{name}/{gi}.{ui}.left"] = u.left.detach().to(torch.float32).cpu()
                    tensors[f"{name}/{gi}.{ui}.right"] = u.right.detach().to(torch.float32).cpu()
        else:
            entry.update(encoding="values")
            tensors[f"{name}/values"] = value.detach().cpu().clone()
        entries[name] = entry
    patch = Patch(
        manifest={
            **dict(manifest),
            "format": PATCH_FORMAT,
            "format_version": PATCH_FORMAT_VERSION,
            "tensors": entries,
        },
        tensors=tensors,
    )
    for name, entry in entries.items():
        want = expected_sha256.get(name)
        if want is not None and want != entry["sha256"]:
            raise PatchError(f"{name} at this version does not hash to the ledger's record")
    produced = patched(patch, {n: pristine(n) for n in entries})
    for name, value in produced.items():
        if tensor_sha256(value) != entries[name]["sha256"]:
            raise PatchError(f"replaying the patch does not reproduce {name} exactly")
    return patch


# -- applying ----------------------------------------------------------------------------


def check_base(patch: Patch, base: Mapping[str, torch.Tensor]) -> None:
    """:class:`BaseMismatch` unless every tensor the patch touches is in ``base``
    with the hash the patch was made against."""
    missing = [n for n in patch.entries if n not in base]
    mismatched = [
        n
        for n, e in patch.entries.items()
        if n in base and tensor_sha256(base[n]) != e["base_sha256"]
    ]
    if missing or mismatched:
        raise BaseMismatch(mismatched, missing)


def accumulators(patch: Patch, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 sums the patch gives each tensor from ``base`` (checked first): the
    replayed factors of a ``low_rank`` entry, the values of a ``values`` one; casting
    a sum to the base's dtype gives the version's tensor."""
    check_base(patch, base)
    out: dict[str, torch.Tensor] = {}
    for name, entry in patch.entries.items():
        w0 = base[name]
        if entry["encoding"] == "values":
            value = patch.tensors[f"{name}/values"]
            if value.dtype != w0.dtype or tuple(value.shape) != tuple(w0.shape):
                raise PatchError(f"the values of {name} do not have the base tensor's dtype and shape")  # fmt: skip
            out[name] = value.to(w0.device, torch.float32)
            continue
        acc = w0.to(torch.float32)
        for g, count in enumerate(entry["groups"]):
            ups = [
                LowRankUpdate(
                    name,
                    patch.tensors[f"{name}/{g}.{u}.left"].to(w0.device, torch.float32),
                    patch.tensors[f"{name}/{g}.{u}.right"].to(w0.device, torch.float32),
                )
                for u in range(int(count))
            ]
            # one fp32 addition per delta, as the runtime stages it
            acc = acc + WeightDelta(method="patch", updates=list(ups)).dense()[name]
        out[name] = acc
    return out


def patched(patch: Patch, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the patch produces from ``base`` (name → tensor in the base's dtype,
    on its device), each checked against the manifest's hash."""
    out: dict[str, torch.Tensor] = {}
    for name, acc in accumulators(patch, base).items():
        value = acc.to(base[name].dtype)
        if tensor_sha256(value) != patch.entries[name]["sha256"]:
            raise PatchError(f"applying the patch to {name} does not give the recorded tensor")
        out[name] = value
    return out


def apply_to_model(patch: Patch, model: torch.nn.Module) -> dict[str, str]:
    """Set the model's parameters to what the patch produces (checked against the
    base's and the result's hashes first; nothing is changed on a mismatch); returns
    the resulting hashes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    values = patched(patch, {n: params[n].detach() for n in patch.entries if n in params})
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    return {name: tensor_sha256(params[name]) for name in values}
