"""The version tree as the ledger records it, without database types: what the
runtime rebuilds a version from (:class:`VersionRecord`, :func:`plan_replay`) and
what jobs walk (:func:`chain`). Pure Python: no SQLAlchemy, no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class ChainError(ValueError):
    """The records do not form a valid chain to the version asked for."""


# the kinds of version that carry a delta (a rollback carries none: its state is its
# parent's); an import's parent is the base
DELTA_KINDS = frozenset({"edit", "import"})


@dataclass(frozen=True)
class VersionRecord:
    """A ledger version as the runtime needs it (no database types).

    ``parent_number`` is the version this one builds on: ``number - 1`` for an edit
    (assumed when absent), the rollback target for a rollback (which carries no
    delta). ``tensor_sha256`` maps tensor names — parameter names and, for method
    state, ``"aux:<name>"`` — to the hashes recorded after this version.
    """

    number: int
    kind: str  # "base" | "edit" | "rollback" | "import"
    parent_number: int | None = None
    delta_path: str | None = None
    delta_sha256: str | None = None
    snapshot_path: str | None = None
    snapshot_sha256: str | None = None
    tensor_sha256: Mapping[str, str] = field(default_factory=dict)

    @property
    def parent(self) -> int | None:
        if self.kind == "base":
            return None
        if self.parent_number is None and self.kind == "edit":
            return self.number - 1
        return self.parent_number


@dataclass(frozen=True)
class ReplayPlan:
    """How to reach ``target``: start from ``start`` ("current", "base" or
    "snapshot" of version ``start_number``), then apply ``deltas`` in order."""

    target: int
    start: str
    start_number: int
    deltas: tuple[VersionRecord, ...]


def plan_replay(
    records: Mapping[int, VersionRecord], target: int, current: int | None = None
) -> ReplayPlan:
    """Walk target → parent → … until the current version, a snapshot, or the base."""
    chain: list[VersionRecord] = []
    number = target
    while True:
        rec = records.get(number)
        if rec is None:
            raise ChainError(f"version {number} (on the chain of {target}) is not in the records")
        if rec.number != number:
            raise ChainError(f"record under key {number} says it is version {rec.number}")
        if rec.kind == "base":
            start = "base"
            break
        if current is not None and number == current:
            start = "current"
            break
        if rec.snapshot_path is not None:
            start = "snapshot"
            break
        if rec.kind in DELTA_KINDS:
            if rec.delta_path is None:
                raise ChainError(f"{rec.kind} version {number} has no delta artifact")
            chain.append(rec)
        elif rec.kind != "rollback":
            raise ChainError(f"version {number} has unknown kind {rec.kind!r}")
        parent = rec.parent
        if parent is None or not 0 <= parent < number:
            raise ChainError(f"version {number} ({rec.kind}) has invalid parent {parent!r}")
        number = parent
    chain.reverse()
    return ReplayPlan(target=target, start=start, start_number=number, deltas=tuple(chain))


def same_state_versions(records: Mapping[int, VersionRecord], number: int) -> list[int]:
    """``number`` and the versions whose state it equals by definition: a rollback
    carries no delta, so it equals its parent (and so on through rollbacks)."""
    out = [number]
    rec = records.get(number)
    while rec is not None and rec.kind == "rollback" and rec.parent is not None:
        if not 0 <= rec.parent < out[-1]:
            break
        out.append(rec.parent)
        rec = records.get(rec.parent)
    return out


def chain(records: Mapping[int, VersionRecord], n: int) -> set[int]:
    """The version numbers from ``n`` back to the base (``n`` included)."""
    seen: set[int] = set()
    cur: int | None = n
    while cur is not None and cur not in seen:
        seen.add(cur)
        cur = records[cur].parent_number
    return seen
