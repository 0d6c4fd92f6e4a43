"""What the runtime's moves report: :class:`Staged` (a delta applied tentatively),
:class:`Drift` and :class:`SyncReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class Drift(NamedTuple):
    """Per touched parameter: ``per_row`` = ‖W − W₀‖_F / rows (rows = d_out in
    nn.Linear orientation, as Gupta et al. normalise), ``relative`` = ‖W − W₀‖_F / ‖W₀‖_F."""

    per_row: dict[str, float]
    relative: dict[str, float]


@dataclass
class Staged:
    """A delta applied tentatively on top of version ``parent_version``.

    ``tensor_sha256``, ``drift`` and ``drift_relative`` cover every parameter touched
    on the chain so far (this delta included; hashes also cover method state as
    ``"aux:<name>"``); ``update_norm`` is ‖ΔW‖_F of this delta over all its parameters.
    """

    parent_version: int
    params: tuple[str, ...]
    tensor_sha256: dict[str, str]
    drift: dict[str, float]
    drift_relative: dict[str, float]
    update_norm: float
    _runtime: Any = field(repr=False, default=None)  # the ModelRuntime while pending
    _prev_acc: dict[str, torch.Tensor | None] = field(repr=False, default_factory=dict)
    _prev_states: list[object] = field(repr=False, default_factory=list)

    @property
    def number(self) -> int:
        """The version this stage becomes when committed (an edit's parent is N − 1)."""
        return self.parent_version + 1

    def snapshot_bytes(self) -> bytes:
        """Snapshot of the staged state, as version :attr:`number` (while still pending)."""
        if self._runtime is None or self._runtime._staged is not self:
            raise RuntimeError("this Staged is no longer pending")
        return self._runtime._snapshot(self.number)


@dataclass(frozen=True)
class SyncReport:
    version: int
    start: str  # "current" | "base" | "snapshot"
    start_number: int
    replayed: tuple[int, ...]
    restored: tuple[str, ...]  # parameters set back to pristine
    verified: int  # number of recorded hashes checked
    unverified: tuple[str, ...]  # touched parameters the record has no hash for
