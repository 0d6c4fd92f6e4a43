"""Values made fit for JSON (and Postgres' JSONB, which has no NaN or Infinity), in
one place, with the one choice spelt out: a non-finite float becomes ``null``
(metrics, evaluation details, alerts: "no number") or its string ``"inf"``/``"nan"``
(the guard's measurements, which keep what was measured; docs/guard.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal


def json_safe(value: Any, non_finite: Literal["null", "string"] = "null") -> Any:
    """``value`` as plain JSON: mappings (keys as strings), lists, strings, booleans,
    integers, finite floats; numpy/torch scalars by their ``item()``. ``TypeError``
    for anything else."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, non_finite) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return None if non_finite == "null" else str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item(), non_finite)
    raise TypeError(f"not a JSON value: {type(value).__name__}")
