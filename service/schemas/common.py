"""What the public schemas share: input models that refuse unknown fields, and the
conversions that let a response schema read an ORM row directly
(``Model.model_validate(row)`` with ``from_attributes``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.jsonsafe import json_safe

# the ledger's integer columns (versions, ids) are PostgreSQL ``integer``
MAX_INT = 2**31 - 1
# a version number or id in a request body: a JSON integer in the column's range
# (``false`` is not 0, ``"3"`` is not 3: strict)
BodyInt = Annotated[int, Field(strict=True, ge=0, le=MAX_INT)]


class Input(BaseModel):
    """A request body: unknown fields are refused (a misspelt field is a 422)."""

    model_config = ConfigDict(extra="forbid")


class Public(BaseModel):
    """A response body, filled from an ORM row or a dict by ``model_validate``."""

    model_config = ConfigDict(from_attributes=True)


def _dict_or_empty(v: Any) -> Any:
    return {} if v is None else v


def _list_or_empty(v: Any) -> Any:
    return [] if v is None else list(v)


def _finite_or_none(v: Any) -> Any:
    """JSON has no inf/NaN: a non-finite headline number (a collapsed model's
    perplexity) is null (:func:`service.jsonsafe.json_safe`); the ``measurements`` of a
    row keep it as "inf"/"nan"."""
    return json_safe(v) if isinstance(v, float) else v


def _number_of(v: Any) -> Any:
    """A version row as its number (an edit's or a guard decision's version)."""
    return getattr(v, "number", v)


def _name_of(v: Any) -> Any:
    """A model row as its name (a job's model)."""
    return getattr(v, "name", v)


def _unit_interval(v: Any) -> Any:
    return min(1.0, max(0.0, v or 0.0))


JsonDict = Annotated[dict[str, Any], BeforeValidator(_dict_or_empty)]
FloatDict = Annotated[dict[str, float], BeforeValidator(_dict_or_empty)]
StrDict = Annotated[dict[str, str], BeforeValidator(_dict_or_empty)]
StrList = Annotated[list[str], BeforeValidator(_list_or_empty)]
IntList = Annotated[list[int], BeforeValidator(_list_or_empty)]
FiniteOrNone = Annotated[float | None, BeforeValidator(_finite_or_none)]
VersionNumber = Annotated[int | None, BeforeValidator(_number_of)]
ModelName = Annotated[str, BeforeValidator(_name_of)]
Fraction = Annotated[float, BeforeValidator(_unit_interval)]
