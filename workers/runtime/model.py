"""The model runtime: one loaded model whose weights equal a ledger version exactly.

A version's state is *derived* (STYLE.md §3, docs/versions.md): every parameter an
edit touched is rebuilt as

    W_N = cast(W_0 + ΔW_1 + ΔW_2 + … + ΔW_N)        (sum in fp32, in ledger order)

from its pristine value W_0 and the deltas on version N's chain — or from a stored
snapshot of the fp32 sums at a version S on that chain, plus the deltas after S.
Nothing is ever undone by subtraction: going back re-derives the older state, and
a tentative edit that is discarded is restored by copying the previous tensors back.
After a rebuild every recorded tensor hash is checked; a mismatch raises
:class:`IntegrityError` and leaves the previous, verified state in place.

The runtime keeps, on the model's own device:

- a pristine copy of every parameter it has ever modified (taken lazily, just
  before the first modification; in the parameter's own dtype, which widens to
  fp32 exactly);
- the fp32 accumulator ``W_0 + Σ ΔW`` of each parameter modified on the current
  chain (``touched_params``);
- method state that is part of a version besides the weights (:class:`ChainState`;
  :class:`AuxState` holds WeightDelta ``aux`` tensors, e.g. AlphaEdit's K Kᵀ;
  :class:`ModuleStates` holds non-additive adaptor state, e.g. GRACE's codebook, and
  installs its adaptor in the model's forward pass).

The ledger is read by the caller; this module sees versions as plain
:class:`VersionRecord` values and artifacts through an :class:`ArtifactStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from service.artifacts import ArtifactStore
from service.ledger.records import ChainError, VersionRecord, plan_replay, same_state_versions
from workers.editing.types import (
    ModuleState,
    WeightDelta,
)
from workers.models.loading import LoadedModel
from workers.runtime import deltas, snapshots
from workers.runtime.hashing import IntegrityError, tensor_sha256
from workers.runtime.staged import Drift, Staged, SyncReport
from workers.runtime.states import AuxState, ChainState, ModuleStates

log = logging.getLogger(__name__)


# -- the runtime -------------------------------------------------------------------------
class ModelRuntime:
    """Holds one model and moves it exactly between ledger versions.

    A fresh runtime is at version 0 (the weights as loaded). Use :meth:`sync` to
    reach a ledger version, :meth:`stage` + :meth:`commit`/:meth:`discard` to add
    one, :meth:`snapshot_bytes` to let later syncs start from here.
    """

    def __init__(self, loaded: LoadedModel | torch.nn.Module, tokenizer: Any = None) -> None:
        if isinstance(loaded, LoadedModel):
            self.loaded: LoadedModel | None = loaded
            self.model: torch.nn.Module = loaded.model
            self._tokenizer = loaded.tokenizer
        else:
            self.loaded = None
            self.model = loaded
            self._tokenizer = tokenizer
        self._params: dict[str, torch.nn.Parameter] = {}
        self._canonical: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            canon = first.setdefault(id(p), name)
            self._canonical[name] = canon
            self._params.setdefault(canon, p)
        self.device = next(iter(self._params.values())).device
        self._pristine: dict[str, torch.Tensor] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._hash_cache: dict[str, str] = {}
        self._base_hashes: dict[str, str] | None = None
        self._w0_norm: dict[str, float] = {}
        self.states: list[ChainState] = [AuxState(self.device), ModuleStates(self.model)]
        self._staged: Staged | None = None
        self.current_version: int | None = 0

    # -- introspection ------------------------------------------------------------
    @property
    def touched_params(self) -> frozenset[str]:
        """Parameters that differ from pristine on the current chain."""
        return frozenset(self._acc)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the :class:`LoadedModel`, or the one given with a bare
        module (None if none was)."""
        return self._tokenizer

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        return self._aux_state().tensors()

    @property
    def modules(self) -> dict[str, ModuleState]:
        """The current version's module states by adaptor name (e.g. GRACE's codebook)."""
        for s in self.states:
            if isinstance(s, ModuleStates):
                return dict(s.values)
        return {}

    def method_state(self) -> dict[str, torch.Tensor | ModuleState]:
        """What an editor sees as ``EditContext.state``: the aux tensors and the
        module states by name (the two share one namespace; a clash is an error)."""
        aux, modules = self.aux, self.modules
        clash = sorted(set(aux) & set(modules))
        if clash:
            raise RuntimeError(f"aux state and module state share the names {clash}")
        return {**aux, **modules}

    def _aux_state(self) -> AuxState:
        for s in self.states:
            if isinstance(s, AuxState):
                return s
        raise RuntimeError("no AuxState configured")

    def param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._params[self._canonical[name]]
        except KeyError:
            raise ValueError(f"the model has no parameter {name!r}") from None

    def canonical(self, name: str) -> str:
        """The name under which a (possibly tied) parameter is tracked and hashed."""
        self.param(name)
        return self._canonical[name]

    def pristine(self, name: str) -> torch.Tensor:
        """W_0 of a parameter (read-only view; do not modify)."""
        canon = self.canonical(name)
        return self._pristine.get(canon, self._params[canon].detach())

    # -- hashing --------------------------------------------------------------------
    def base_hashes(self) -> dict[str, str]:
        """sha256 of every parameter of the pristine model (computed once)."""
        if self._base_hashes is None:
            self._base_hashes = {
                name: tensor_sha256(self._pristine.get(name, p.detach()))
                for name, p in self._params.items()
            }
        return dict(self._base_hashes)

    def tensor_hashes(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Current hashes of ``names`` (default: the touched parameters and the
        method state). Names may be parameters or ``"<prefix><state name>"``; method
        state that the current version does not have is left out."""
        if names is None:
            names = sorted(self._acc) + sorted(self._state_hash_names())
        out: dict[str, str] = {}
        for name in names:
            h = self._hash_of(name)
            if h is not None:
                out[name] = h
        return out

    def _state_hash_names(self) -> list[str]:
        return [s.prefix + k for s in self.states for k in s.tensors()]

    def _hash_of(self, name: str) -> str | None:
        """The hash of a parameter or of method state (None: no such state now)."""
        for s in self.states:
            if name.startswith(s.prefix):
                t = s.tensors().get(name[len(s.prefix) :])
                return None if t is None else tensor_sha256(t)
        canon = self.canonical(name)
        cached = self._hash_cache.get(canon)
        if cached is None:
            cached = self._hash_cache[canon] = tensor_sha256(self._params[canon])
        return cached

    # -- drift ------------------------------------------------------------------------
    def rows(self, name: str) -> int:
        """d_out in nn.Linear orientation (a GPT-2 Conv1D weight is [d_in, d_out])."""
        p = self.param(name)
        module_name = self.canonical(name).rpartition(".")[0]
        module = self.model.get_submodule(module_name) if module_name else self.model
        if isinstance(module, Conv1D) and p.dim() == 2:
            return int(p.shape[1])
        return int(p.shape[0]) if p.dim() else 1

    def _drift_of(self, name: str) -> tuple[float, float]:
        w = self._params[name].detach().to(torch.float32)
        w0 = self._pristine.get(name, self._params[name].detach()).to(torch.float32)
        diff = float(torch.linalg.vector_norm(w - w0, dtype=torch.float64))
        if name not in self._w0_norm:
            self._w0_norm[name] = float(torch.linalg.vector_norm(w0, dtype=torch.float64))
        base = self._w0_norm[name]
        return diff / self.rows(name), (diff / base if base > 0 else float("inf"))

    def drift(self) -> Drift:
        """Drift of every touched parameter from its pristine value (see :class:`Drift`)."""
        pairs = {n: self._drift_of(n) for n in sorted(self._acc)}
        return Drift({n: a for n, (a, _) in pairs.items()}, {n: r for n, (_, r) in pairs.items()})

    # -- primitive moves -----------------------------------------------------------
    def _ensure_pristine(self, name: str) -> torch.Tensor:
        t = self._pristine.get(name)
        if t is None:
            t = self._pristine[name] = self._params[name].detach().clone()
        return t

    def _write(self, name: str, value: torch.Tensor) -> None:
        """Set a parameter to ``value`` cast to its dtype (one rounding, no arithmetic)."""
        self._ensure_pristine(name)
        with torch.no_grad():
            self._params[name].copy_(value)
        self._hash_cache.pop(name, None)

    def _restore_pristine(self, name: str) -> None:
        with torch.no_grad():
            self._params[name].copy_(self._pristine[name])
        self._hash_cache.pop(name, None)

    def _apply_to(
        self, acc: Mapping[str, torch.Tensor], delta: WeightDelta
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The accumulators ``delta`` changes, from ``acc`` (its values first, then its
        additive updates, one fp32 addition each), and each one's change: the ΔW of
        an additive update, ``value − before`` of a set one."""
        if not delta.is_finite():
            raise ValueError("refusing a delta with non-finite values")
        for s in self.states:
            s.validate(delta)
        dense = deltas.additive(delta, self.canonical, self._params)
        new = deltas.values(delta, self.canonical, self._params)
        change = {name: value - self._start(name, acc) for name, value in new.items()}
        for name, d in dense.items():
            new[name] = self._start(name, {**acc, **new}) + d
            change[name] = d if name not in change else new[name] - self._start(name, acc)
        return new, change

    def _start(self, name: str, acc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        have = acc.get(name)
        if have is not None:
            return have
        return self._pristine.get(name, self._params[name].detach()).to(torch.float32)

    # -- stage / commit / discard -------------------------------------------------------
    def stage(self, delta: WeightDelta) -> Staged:
        """Apply ``delta`` tentatively on top of the current version."""
        if self._staged is not None:
            raise RuntimeError("a staged delta is pending: commit or discard it first")
        if self.current_version is None:
            raise RuntimeError("the runtime is not at a known version: sync first")
        new, changes = self._apply_to(self._acc, delta)
        for name in new:
            if not bool(torch.isfinite(new[name]).all()):
                raise ValueError(f"refusing a delta that makes {name} non-finite")
        prev_acc = {name: self._acc.get(name) for name in new}
        prev_states = [s.checkpoint() for s in self.states]
        for name, value in new.items():
            self._acc[name] = value
            self._write(name, value)
        for s in self.states:
            s.apply(delta)
        norm = sum(float(d.double().pow(2).sum()) for d in changes.values()) ** 0.5
        drift = self.drift()
        staged = Staged(
            parent_version=self.current_version,
            params=tuple(new),
            tensor_sha256=self.tensor_hashes(),
            drift=drift.per_row,
            drift_relative=drift.relative,
            update_norm=norm,
            _runtime=self,
            _prev_acc=prev_acc,
            _prev_states=prev_states,
        )
        self._staged = staged
        return staged

    def commit(self, staged: Staged, number: int) -> None:
        """Make the staged state version ``number`` (after the ledger recorded it)."""
        self._check_staged(staged)
        self.current_version = number
        self._staged = None
        staged._runtime = None
        staged._prev_acc = {}
        staged._prev_states = []

    def discard(self, staged: Staged) -> None:
        """Put back the state before :meth:`stage`, bit for bit (copies, no subtraction)."""
        self._check_staged(staged)
        for name, prev in staged._prev_acc.items():
            if prev is None:
                del self._acc[name]
                self._restore_pristine(name)
            else:
                self._acc[name] = prev
                self._write(name, prev)
        for s, token in zip(self.states, staged._prev_states, strict=True):
            s.restore(token)
        self._staged = None
        staged._runtime = None

    def _check_staged(self, staged: Staged) -> None:
        if self._staged is None or staged is not self._staged:
            raise RuntimeError("this Staged is not the runtime's pending stage")

    # -- sync -------------------------------------------------------------------------
    def sync(
        self,
        records: Mapping[int, VersionRecord],
        target: int,
        store: ArtifactStore,
        *,
        from_scratch: bool = False,
        progress: Callable[[float, str], None] | None = None,
    ) -> SyncReport:
        """Rebuild version ``target`` and verify its recorded hashes.

        Starts from the current state when the current version is on the target's
        chain (unless ``from_scratch``), else from the nearest snapshot on the chain,
        else from the base; replays the deltas after it. Parameters modified in
        memory but not on the target's chain go back to pristine. On a hash mismatch
        the previous state is put back and :class:`IntegrityError` is raised.
        """
        if self._staged is not None:
            raise RuntimeError("a staged delta is pending: commit or discard it first")
        plan = plan_replay(records, target, None if from_scratch else self.current_version)
        old_acc = dict(self._acc)
        old_states = [s.checkpoint() for s in self.states]
        try:
            acc: dict[str, torch.Tensor] = {}
            if plan.start == "current":
                acc = dict(self._acc)
            else:
                for s in self.states:
                    s.reset()
                if plan.start == "snapshot":
                    acc = self._load_snapshot(
                        records[plan.start_number],
                        store,
                        same_state_versions(records, plan.start_number),
                    )
            for i, rec in enumerate(plan.deltas):
                if progress is not None:
                    progress(i / max(len(plan.deltas), 1), f"replaying version {rec.number}")
                delta = WeightDelta.from_bytes(store.get(rec.delta_path, rec.delta_sha256))
                acc.update(self._apply_to(acc, delta)[0])
                for s in self.states:
                    s.apply(delta)
        except BaseException:
            for s, token in zip(self.states, old_states, strict=True):
                s.restore(token)
            raise
        restored = self._install(acc, old_acc)
        rec = records[target]
        try:
            verified = self._verify(rec, restored, records.get(0))
        except IntegrityError:
            self._install(old_acc, acc)
            for s, token in zip(self.states, old_states, strict=True):
                s.restore(token)
            raise
        self.current_version = target
        unverified = tuple(sorted(n for n in self._acc if n not in rec.tensor_sha256))
        if unverified:
            log.warning("version %d records no hash for %s", target, ", ".join(unverified))
        if progress is not None:
            progress(1.0, f"at version {target}")
        log.info(
            "synced to version %d from %s %d, replayed %s",
            target,
            plan.start,
            plan.start_number,
            [r.number for r in plan.deltas],
        )
        return SyncReport(
            version=target,
            start=plan.start,
            start_number=plan.start_number,
            replayed=tuple(r.number for r in plan.deltas),
            restored=restored,
            verified=verified,
            unverified=unverified,
        )

    def _install(
        self, acc: dict[str, torch.Tensor], old_acc: Mapping[str, torch.Tensor]
    ) -> tuple[str, ...]:
        """Write ``acc`` into the model; parameters of ``old_acc`` not in it → pristine."""
        for name, value in acc.items():
            if old_acc.get(name) is not value:
                self._write(name, value)
        restored = tuple(sorted(n for n in old_acc if n not in acc))
        for name in restored:
            self._restore_pristine(name)
        self._acc = dict(acc)
        return restored

    def _verify(
        self, rec: VersionRecord, restored: Iterable[str], base: VersionRecord | None
    ) -> int:
        expected = dict(rec.tensor_sha256)
        if base is not None:
            # parameters put back to pristine must hash as the base recorded them
            for name in restored:
                if name in base.tensor_sha256:
                    expected.setdefault(name, base.tensor_sha256[name])
        for name, want in expected.items():
            try:
                have = self._hash_of(name)
            except ValueError as e:
                raise IntegrityError(f"version {rec.number}: {e}") from None
            if have is None:
                raise IntegrityError(f"version {rec.number}: method state {name} is missing")
            if have != want:
                raise IntegrityError(
                    f"version {rec.number}: rebuilt tensor {name} hashes to {have}, "
                    f"the ledger records {want}"
                )
        return len(expected)

    @contextmanager
    def at_base(self) -> Iterator[None]:
        """Inside the block the model is its base (version 0: pristine weights, no
        method state); afterwards it is exactly the current version again (the same
        bits). For what must not depend on the edits so far: context templates and
        statistics computed on first use."""
        if self._staged is not None:
            raise RuntimeError("a staged delta is pending: commit or discard it first")
        saved = {name: self._params[name].detach().clone() for name in self._acc}
        tokens = [s.checkpoint() for s in self.states]
        try:
            for name in saved:
                self._restore_pristine(name)
            for s in self.states:
                s.reset()
            yield
        finally:
            for name, value in saved.items():
                self._write(name, value)
            for s, token in zip(self.states, tokens, strict=True):
                s.restore(token)

    # -- snapshots ------------------------------------------------------------------
    def snapshot_bytes(self) -> bytes:
        """The current accumulators and method state as one safetensors blob, so that
        a later :meth:`sync` can start from this version (see ``Staged.snapshot_bytes``
        for a pending stage)."""
        if self._staged is not None:
            raise RuntimeError("a staged delta is pending: commit or discard it first")
        if self.current_version is None:
            raise RuntimeError("the runtime is not at a known version")
        return self._snapshot(self.current_version)

    def _snapshot(self, version: int) -> bytes:
        return snapshots.encode(version, self._acc, self.states)

    def _load_snapshot(
        self, rec: VersionRecord, store: ArtifactStore, same_state: Iterable[int]
    ) -> dict[str, torch.Tensor]:
        """Accumulators from ``rec``'s snapshot (:func:`workers.runtime.snapshots.decode`);
        the method states are loaded from it."""
        if rec.snapshot_path is None:
            raise ChainError(f"version {rec.number} has no snapshot")
        blob = store.get(rec.snapshot_path, rec.snapshot_sha256)
        header, tensors = snapshots.decode(blob, rec, same_state)
        acc: dict[str, torch.Tensor] = {}
        for name in header["params"]:
            canon = self.canonical(name)
            p = self._params[canon]
            t = tensors[snapshots.ACC + name]
            if tuple(t.shape) != tuple(p.shape) or t.dtype != torch.float32:
                raise IntegrityError(f"snapshot tensor {name} does not fit the model")
            acc[canon] = t.to(p.device)
        for s in self.states:
            s.load({k[len(s.prefix) :]: v for k, v in tensors.items() if k.startswith(s.prefix)})
        return acc
