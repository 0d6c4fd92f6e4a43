"""GRACE's key-value codebook and the adaptor that applies it (Hartvigsen et al. 2023,
"Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors", §3).

A codebook sits at one module f (here the MLP output projection of one layer). It
holds m entries (key kᵢ, value vᵢ, deferral radius εᵢ, label yᵢ). For an input h of
f, with i* the nearest key in Euclidean distance (GRACE eq. 2):

    GRACE(h) = v_{i*}   if ‖h − k_{i*}‖₂ ≤ ε_{i*}
               f(h)     otherwise (the model's own output: "deferral")

Which positions are queries. GRACE keys an edit on the layer input at the prompt's
last token; the paper's reference code queries the last token of the input. memedit
applies the rule **at every position independently**: in autoregressive generation
every position is the last token when its successor is produced, so this is the
paper's rule step by step, and it makes the adaptor independent of padding (left or
right), batching, KV caching and teacher-forced scoring (prompt + target in one
pass) — each position's output depends on its own input only. Padded positions may
match an entry too; attention masks them, so it changes nothing.

Distances are decided pair by pair in fp32 (``torch.cdist`` without the matrix-
product shortcut), so a position's decision does not depend on the batch's shape.
Doing that for every position against every key costs N·m·d scalar operations (4 s
per forward of 960 positions against 1,000 keys on one CPU thread), so positions
are first screened with the ‖q‖² + ‖k‖² − 2qᵀk expansion in fp64 (a matrix product,
0.4 s there): only those within ``_SCREEN_TOL`` of some key's radius are decided
exactly. The screen's error (≲ 1e-6 here) is far below the tolerance, so it never
drops a position the exact rule would replace.

The codebook is stored as a :class:`~workers.editing.types.ModuleState` named
``"grace"``: ``keys [m, d_in]``, ``values [m, d_out]``, ``radii [m]`` (fp32),
``labels [m, T]`` (int64 token ids of " " + target, padded with −1). The runtime
(``workers/runtime.py``) installs :class:`GraceAdaptor` as a forward hook on the
module whenever the model's version has a codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from workers.editing.types import ModuleState

PAD_LABEL = -1
TENSORS = ("keys", "values", "radii", "labels")
_SCREEN_TOL = 1e-3  # absolute, + 1e-4 relative to the radius (see the module docstring)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear map: ``nn.Linear`` or GPT-2's ``Conv1D`` (nx → nf)."""
    if isinstance(getattr(module, "in_features", None), int):
        return int(module.in_features), int(module.out_features)
    if isinstance(getattr(module, "nx", None), int):
        return int(module.nx), int(module.nf)
    raise TypeError(f"a codebook needs a linear module, not {type(module).__name__}")


@dataclass
class Codebook:
    """The entries as tensors (fp32 keys/values/radii, int64 labels) on one device."""

    module: str
    keys: torch.Tensor  # [m, d_in]
    values: torch.Tensor  # [m, d_out]
    radii: torch.Tensor  # [m]
    labels: torch.Tensor  # [m, T]

    @classmethod
    def empty(cls, module: str, d_in: int, d_out: int, device: torch.device | str) -> Codebook:
        return cls(
            module,
            torch.zeros(0, d_in, device=device),
            torch.zeros(0, d_out, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, 1, dtype=torch.long, device=device),
        )

    @classmethod
    def from_state(cls, state: ModuleState, device: torch.device | str = "cpu") -> Codebook:
        missing = [k for k in TENSORS if k not in state.tensors]
        if missing:
            raise ValueError(f"codebook state lacks {missing}")
        t = {k: state.tensors[k].detach().to(device) for k in TENSORS}
        return cls(
            state.module,
            t["keys"].float(),
            t["values"].float(),
            t["radii"].float(),
            t["labels"].long(),
        )

    def to_state(self) -> ModuleState:
        return ModuleState(
            module=self.module,
            tensors={
                "keys": self.keys.detach().float().contiguous().clone(),
                "values": self.values.detach().float().contiguous().clone(),
                "radii": self.radii.detach().float().contiguous().clone(),
                "labels": self.labels.detach().long().contiguous().clone(),
            },
        )

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def nearest(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each row of ``query`` [N, d_in]
        (requires a non-empty codebook; ties go to the lower index)."""
        return nearest_keys(self.keys, query)

    def label_of(self, i: int) -> list[int]:
        return [int(x) for x in self.labels[i] if int(x) != PAD_LABEL]

    def with_entry(
        self, key: torch.Tensor, value: torch.Tensor, radius: float, label: list[int]
    ) -> Codebook:
        """A new codebook with one more entry (the tensors are new; ``self`` is unchanged)."""
        width = max(int(self.labels.shape[1]), len(label))
        labels = torch.full(
            (self.size + 1, width), PAD_LABEL, dtype=torch.long, device=self.labels.device
        )
        labels[: self.size, : self.labels.shape[1]] = self.labels
        labels[self.size, : len(label)] = torch.tensor(label, dtype=torch.long)
        return Codebook(
            self.module,
            torch.cat([self.keys, key.detach().float().reshape(1, -1)]),
            torch.cat([self.values, value.detach().float().reshape(1, -1)]),
            torch.cat([self.radii, torch.tensor([radius], device=self.radii.device)]),
            labels,
        )

    def with_label(self, i: int, label: list[int]) -> Codebook:
        width = max(int(self.labels.shape[1]), len(label))
        labels = torch.full(
            (self.size, width), PAD_LABEL, dtype=torch.long, device=self.labels.device
        )
        labels[:, : self.labels.shape[1]] = self.labels
        labels[i] = PAD_LABEL
        labels[i, : len(label)] = torch.tensor(label, dtype=torch.long)
        return Codebook(self.module, self.keys, self.values, self.radii, labels)


def nearest_keys(keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, the nearest of ``keys`` [m, d] for each row
    of ``query`` [N, d], in fp32, each pair computed on its own (no ‖q‖²+‖k‖²−2qᵀk
    shortcut, whose rounding depends on the matrix shapes)."""
    q = query.detach().to(torch.float32)
    dist = torch.cdist(
        q.unsqueeze(0),
        keys.to(torch.float32).unsqueeze(0),
        compute_mode="donot_use_mm_for_euclid_dist",
    )[0]
    return dist.min(dim=-1)


def codebook_output(
    keys: torch.Tensor,
    values: torch.Tensor,
    radii: torch.Tensor,
    inputs: torch.Tensor,
    output: torch.Tensor,
) -> torch.Tensor | None:
    """GRACE eq. 2 at every position: ``output`` with the rows whose input lies within
    the nearest key's radius replaced by that key's value (cast to the output's
    dtype); None when no position matches. ``values`` may require grad (the editor
    trains one row through this function)."""
    if keys.shape[0] == 0:
        return None
    d_in, d_out = inputs.shape[-1], output.shape[-1]
    query = inputs.detach().reshape(-1, d_in)
    radii = radii.detach().to(device=query.device, dtype=torch.float32)
    rows = _screen(keys.detach().to(query.device), radii, query)
    if rows.numel() == 0:
        return None
    dist, idx = nearest_keys(keys.to(query.device), query[rows])
    hit = dist <= radii[idx]
    if not bool(hit.any()):
        return None
    rows, idx = rows[hit], idx[hit]
    flat = output.reshape(-1, d_out)
    mask = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    mask[rows] = True
    chosen = torch.zeros_like(flat)
    chosen = chosen.index_copy(0, rows, values[idx].to(device=flat.device, dtype=flat.dtype))
    return torch.where(mask.unsqueeze(-1), chosen, flat).reshape(output.shape)


def _screen(keys: torch.Tensor, radii: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``query`` that may lie within some key's radius (a
    superset of those that do), from fp64 distances via one matrix product."""
    q, k = query.to(torch.float64), keys.to(torch.float64)
    d2 = q.pow(2).sum(-1, keepdim=True) + k.pow(2).sum(-1) - 2.0 * (q @ k.T)
    approx = d2.clamp_min(0.0).sqrt()
    limit = radii.to(torch.float64) * (1 + 1e-4) + _SCREEN_TOL
    return (approx <= limit).any(-1).nonzero().squeeze(-1)


class GraceAdaptor:
    """What the runtime needs to install a GRACE codebook (``ModuleState`` ``"grace"``)."""

    name: ClassVar[str] = "grace"

    def validate(self, state: ModuleState, module: nn.Module) -> None:
        missing = [k for k in TENSORS if k not in state.tensors]
        extra = sorted(set(state.tensors) - set(TENSORS))
        if missing or extra:
            raise ValueError(f"GRACE codebook tensors: missing {missing}, unexpected {extra}")
        d_in, d_out = module_dims(module)
        keys, values = state.tensors["keys"], state.tensors["values"]
        radii, labels = state.tensors["radii"], state.tensors["labels"]
        m = int(keys.shape[0]) if keys.dim() == 2 else -1
        shapes = {
            "keys": (tuple(keys.shape), (m, d_in)),
            "values": (tuple(values.shape), (m, d_out)),
            "radii": (tuple(radii.shape), (m,)),
        }
        for name, (have, want) in shapes.items():
            if have != want:
                raise ValueError(f"GRACE codebook {name} has shape {have}, expected {want}")
        if labels.dim() != 2 or int(labels.shape[0]) != m or labels.is_floating_point():
            raise ValueError(f"GRACE codebook labels must be integer [{m}, T]")
        if not all(t.is_floating_point() for t in (keys, values, radii)):
            raise ValueError("GRACE codebook keys, values and radii must be floating point")
        if not bool((radii >= 0).all()):
            raise ValueError("GRACE deferral radii must be non-negative")

    def forward(
        self, tensors: dict[str, torch.Tensor], inputs: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        return codebook_output(tensors["keys"], tensors["values"], tensors["radii"], inputs, output)
