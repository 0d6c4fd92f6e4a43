"""Method state that is part of a version besides the weights: :class:`AuxState`
(additive tensors, e.g. AlphaEdit's K Kᵀ) and :class:`ModuleStates` (non-additive
adaptor state, e.g. GRACE's codebook, with its forward hook installed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from workers.editing.registry import get_adaptor
from workers.editing.types import ModuleState, WeightDelta
from workers.runtime.hashing import IntegrityError

log = logging.getLogger(__name__)


class ChainState(Protocol):
    """Extension point: method state that belongs to a version besides the weights.

    It is replayed with the deltas, snapshotted with the accumulators and hashed
    under ``prefix + name``. :class:`AuxState` is the additive kind (AlphaEdit's
    K Kᵀ); :class:`ModuleStates` the replacing kind (GRACE's codebook), whose
    ``apply``/``restore``/``load``/``reset`` also (re)install its adaptor on the model.
    ``tensors`` may have any dtype; snapshots keep it.
    """

    prefix: str

    def validate(self, delta: WeightDelta) -> None: ...
    def apply(self, delta: WeightDelta) -> None: ...
    def checkpoint(self) -> object: ...
    def restore(self, token: object) -> None: ...
    def reset(self) -> None: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def load(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


class AuxState:
    """Additive fp32 method state: ``aux[name] = Σ increments`` over the chain, summed
    in ledger order. A delta's increments are its dense ``aux`` tensors and its
    ``aux_factors`` K densified to K Kᵀ (``WeightDelta.aux_increments``: a fixed-order
    fp64 sum rounded once), so replay is bit-exact whatever the thread count."""

    prefix = "aux:"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values: dict[str, torch.Tensor] = {}

    def validate(self, delta: WeightDelta) -> None:
        shapes = [(name, tuple(t.shape)) for name, t in delta.aux.items()]
        for name, k in delta.aux_factors.items():
            if k.dim() != 2:
                raise ValueError(f"aux factor {name!r} is not a matrix: {tuple(k.shape)}")
            shapes.append((name, (k.shape[0], k.shape[0])))
        for name, shape in shapes:
            have = self.values.get(name)
            if have is not None and tuple(have.shape) != shape:
                raise ValueError(
                    f"aux state {name!r} has shape {tuple(have.shape)}, the delta adds {shape}"
                )

    def apply(self, delta: WeightDelta) -> None:
        for name, t in delta.aux_increments():
            add = t.to(device=self.device, dtype=torch.float32)
            have = self.values.get(name)
            # out of place: checkpoints hold references to the old tensors
            self.values[name] = add.clone() if have is None else have + add

    def checkpoint(self) -> object:
        return dict(self.values)

    def restore(self, token: object) -> None:
        if not isinstance(token, dict):
            raise TypeError("not an AuxState checkpoint")
        self.values = dict(token)

    def reset(self) -> None:
        self.values = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.values = {k: v.to(device=self.device, dtype=torch.float32) for k, v in tensors.items()}


_MODULE_PATH = "module"  # ModuleStates.tensors(): "<name>.module" = utf-8 bytes of the path


class ModuleStates:
    """Non-additive adaptor state (:class:`ModuleState` by adaptor name, e.g. GRACE's
    codebook ``"grace"``): a version's state of a name is the one set by the latest
    delta on its chain that sets it — replaced, never summed — so replay, rollback
    and discard are exact copies.

    While a state exists, the runtime owns one forward hook on its module (registered
    first, ``prepend=True``, so every other hook sees the served output). The hook
    reads the *current* state at each call and applies the adaptor
    (``workers.editing.registry.get_adaptor(name).forward``); with no state (version
    0, or after a rollback past the first such edit) no hook is left on the model.

    Hash names are ``state:<name>.<tensor>`` plus ``state:<name>.module`` (the module
    path as utf-8 bytes), so the ledger's ``tensor_sha256`` and snapshots cover where
    the adaptor sits as well as its tensors.
    """

    prefix = "state:"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.values: dict[str, ModuleState] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def _module(self, path: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the model has no module {path!r}") from None

    def validate(self, delta: WeightDelta) -> None:
        for name, state in delta.modules.items():
            if not state.is_finite():
                raise ValueError(f"refusing module state {name!r} with non-finite values")
            get_adaptor(name).validate(state, self._module(state.module))

    def apply(self, delta: WeightDelta) -> None:
        if not delta.modules:
            return
        values = dict(self.values)  # a new dict: checkpoints hold the old one
        for name, state in delta.modules.items():
            device = _device_of(self._module(state.module))
            values[name] = ModuleState(
                state.module,
                {k: t.detach().contiguous().to(device).clone() for k, t in state.tensors.items()},
            )
        self.values = values
        self._install()

    def checkpoint(self) -> object:
        return dict(self.values)

    def restore(self, token: object) -> None:
        if not isinstance(token, dict):
            raise TypeError("not a ModuleStates checkpoint")
        self.values = dict(token)
        self._install()

    def reset(self) -> None:
        self.values = {}
        self._install()

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, state in self.values.items():
            path = torch.frombuffer(bytearray(state.module.encode()), dtype=torch.uint8)
            out[f"{name}.{_MODULE_PATH}"] = path
            for key, t in state.tensors.items():
                out[f"{name}.{key}"] = t
        return out

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for full, t in tensors.items():
            name, _, key = full.partition(".")
            grouped.setdefault(name, {})[key] = t
        values: dict[str, ModuleState] = {}
        for name, group in grouped.items():
            path = group.pop(_MODULE_PATH, None)
            if path is None:
                raise IntegrityError(f"snapshot module state {name!r} names no module")
            state = ModuleState(bytes(path.to(torch.uint8).tolist()).decode(), group)
            self.validate(WeightDelta(method="snapshot", modules={name: state}))
            values[name] = state
        self.values = {}
        self.apply(WeightDelta(method="snapshot", modules=values))
        self._install()

    # -- the adaptor hooks ----------------------------------------------------------
    def _install(self) -> None:
        """Exactly one hook on every module that some current state names."""
        wanted = {state.module for state in self.values.values()}
        for path in [p for p in self._hooks if p not in wanted]:
            self._hooks.pop(path).remove()
        for path in sorted(wanted - set(self._hooks)):
            self._hooks[path] = self._module(path).register_forward_hook(
                self._hook(path), prepend=True
            )

    def _hook(self, path: str) -> Callable[..., torch.Tensor | None]:
        def hook(_module: torch.nn.Module, args: tuple, output: object) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor) or not args:
                raise TypeError(f"adaptor on {path}: expected a tensor in and a tensor out")
            out: torch.Tensor | None = None
            for name in sorted(self.values):
                state = self.values[name]
                if state.module == path:
                    new = get_adaptor(name).forward(
                        state.tensors, args[0], output if out is None else out
                    )
                    out = new if new is not None else out
            return out

        return hook


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
