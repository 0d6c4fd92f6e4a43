"""The editing methods by id: one explicit dict, checked at import.

The id is the same string in the API, the hparams (``service.hparams.METHODS``), the
ledger and the metrics. Adding a method: write ``editing/<id>.py`` with an
``Editor`` class, add it to ``_EDITOR_CLASSES`` and its hparams to
``service/hparams.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.hparams import METHODS
from workers.editing.alphaedit import AlphaEditEditor
from workers.editing.emmet import EmmetEditor
from workers.editing.memit import MemitEditor
from workers.editing.rome import RomeEditor
from workers.editing.types import EditContext, EditRequest, WeightDelta


@runtime_checkable
class Editor(Protocol):
    """STYLE.md §2. ``compute_delta`` hands the model back bit-identical."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type[BaseModel]]

    def compute_delta(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: BaseModel,
        ctx: EditContext,
    ) -> WeightDelta: ...


class RegistryError(RuntimeError):
    pass


def _build(classes: Sequence[type]) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in classes:
        if cls.name in out:
            raise RegistryError(f"duplicate editing method id {cls.name!r}")
        out[cls.name] = cls
    if tuple(out) != METHODS:
        raise RegistryError(f"registry {tuple(out)} does not match service.hparams.METHODS")
    return out


_EDITOR_CLASSES: tuple[type, ...] = (RomeEditor, MemitEditor, EmmetEditor, AlphaEditEditor)
EDITORS: dict[str, type] = _build(_EDITOR_CLASSES)


class UnknownEditor(KeyError):
    pass


def get_editor(method: str) -> Editor:
    try:
        return EDITORS[method]()
    except KeyError:
        raise UnknownEditor(f"unknown editing method {method!r}; known: {list(EDITORS)}") from None
