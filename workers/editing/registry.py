"""The editing methods by id: one explicit dict, checked at import.

The id is the same string in the API, the hparams
(``workers.editing.hparams.METHODS``), the ledger and the metrics. Adding a method:
write ``editing/<id>.py`` with a subclass of :class:`~workers.editing.editor.Editor`
(its capabilities declared there), add it to ``_EDITOR_CLASSES``, and
its hparams class as ``editing/hparams/<id>.py``, added to
``workers/editing/hparams/methods.py``.

Adaptors (``ADAPTORS``) are the forward-pass changes that non-additive method state
needs (a :class:`~workers.editing.types.ModuleState` in a delta's ``modules``, by
adaptor name): the runtime validates the state with the adaptor and installs its
``forward`` as a hook on the state's module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol, runtime_checkable

import torch

from workers.editing.alphaedit import AlphaEditEditor
from workers.editing.common.codebook import GraceAdaptor
from workers.editing.editor import Editor
from workers.editing.emmet import EmmetEditor
from workers.editing.ft import FtCEditor, FtLEditor
from workers.editing.grace import GraceEditor
from workers.editing.hparams import METHODS
from workers.editing.memit import MemitEditor
from workers.editing.rome import RomeEditor, RomeOriginalEditor
from workers.editing.types import ModuleState


class RegistryError(RuntimeError):
    pass


def _build(classes: Sequence[type[Editor]]) -> dict[str, type[Editor]]:
    out: dict[str, type[Editor]] = {}
    for cls in classes:
        if cls.name in out:
            raise RegistryError(f"duplicate editing method id {cls.name!r}")
        out[cls.name] = cls
    if tuple(out) != METHODS:
        raise RegistryError(f"registry {tuple(out)} does not match workers.editing.hparams.METHODS")
    return out


_EDITOR_CLASSES: tuple[type[Editor], ...] = (
    RomeEditor,
    RomeOriginalEditor,
    MemitEditor,
    EmmetEditor,
    AlphaEditEditor,
    FtLEditor,
    FtCEditor,
    GraceEditor,
)
EDITORS: dict[str, type[Editor]] = _build(_EDITOR_CLASSES)


@runtime_checkable
class Adaptor(Protocol):
    """Applies a named :class:`ModuleState` in the forward pass of its module."""

    name: ClassVar[str]

    def validate(self, state: ModuleState, module: torch.nn.Module) -> None: ...

    def forward(
        self, tensors: Mapping[str, torch.Tensor], inputs: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None: ...


def _build_adaptors(classes: Sequence[type]) -> dict[str, Adaptor]:
    out: dict[str, Adaptor] = {}
    for cls in classes:
        if cls.name in out:
            raise RegistryError(f"duplicate adaptor name {cls.name!r}")
        out[cls.name] = cls()
    return out


_ADAPTOR_CLASSES: tuple[type, ...] = (GraceAdaptor,)
ADAPTORS: dict[str, Adaptor] = _build_adaptors(_ADAPTOR_CLASSES)


class UnknownAdaptor(ValueError):
    pass


def get_adaptor(name: str) -> Adaptor:
    try:
        return ADAPTORS[name]
    except KeyError:
        raise UnknownAdaptor(f"unknown module state {name!r}; known: {list(ADAPTORS)}") from None


class UnknownEditor(KeyError):
    pass


def get_editor(method: str) -> Editor:
    try:
        return EDITORS[method]()
    except KeyError:
        raise UnknownEditor(f"unknown editing method {method!r}; known: {list(EDITORS)}") from None
