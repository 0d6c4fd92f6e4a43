"""Every method's hyper-parameters class by method id, and the ways to get an instance:
its per-architecture defaults, a stored dict, or a base with user overrides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from workers.editing.hparams.alphaedit import AlphaEditHParams
from workers.editing.hparams.base import MethodHParams
from workers.editing.hparams.emmet import EmmetHParams
from workers.editing.hparams.ft import FtCHParams, FtLHParams
from workers.editing.hparams.grace import GraceHParams
from workers.editing.hparams.memit import MemitHParams
from workers.editing.hparams.rome import RomeHParams, RomeOriginalHParams

# every method's hparams class, in the order of METHODS; adding a method adds its
# class here (and its editor to workers/editing/registry.py)
_CLASSES: tuple[type[MethodHParams], ...] = (
    RomeHParams,
    RomeOriginalHParams,
    MemitHParams,
    EmmetHParams,
    AlphaEditHParams,
    FtLHParams,
    FtCHParams,
    GraceHParams,
)
METHODS = tuple(cls.model_fields["method"].default for cls in _CLASSES)
HPARAMS_CLASSES: dict[str, type[MethodHParams]] = dict(zip(METHODS, _CLASSES, strict=True))
HParams = Annotated[Union[_CLASSES], Field(discriminator="method")]  # noqa: UP007
_ADAPTER: TypeAdapter[MethodHParams] = TypeAdapter(HParams)


class UnknownMethod(ValueError):
    pass


def hparams_class(method: str) -> type[MethodHParams]:
    try:
        return HPARAMS_CLASSES[method]
    except KeyError:
        raise UnknownMethod(f"unknown method {method!r}; known: {list(METHODS)}") from None


def defaults_for(method: str, model_type: str, num_layers: int, d_mlp: int) -> MethodHParams:
    """Per-architecture defaults of ``method`` (sources in the package docstring)."""
    return hparams_class(method).defaults(model_type, num_layers, d_mlp)


def parse_hparams(data: Mapping[str, Any]) -> MethodHParams:
    """Validate a stored hparams dict (with its ``method`` key)."""
    return _ADAPTER.validate_python(dict(data))


def with_overrides(base: MethodHParams, overrides: Mapping[str, Any] | None) -> MethodHParams:
    """``base`` with user overrides applied and validated. An unknown key fails
    with a ``ValidationError`` whose location is that key (``extra_forbidden``)."""
    if not overrides:
        return base
    if "method" in overrides and overrides["method"] != base.method:
        raise ValueError(f"overrides may not change the method ({base.method!r})")
    return type(base).model_validate({**base.model_dump(), **dict(overrides)})
