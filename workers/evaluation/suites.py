"""The evaluation suites by name: one explicit dict of dotted paths, imported lazily.

Every suite is a pure function in its own module (torch, transformers, lm-eval; no
database, no Redis, no service imports)::

    def run_suite(model, tok, params, *, progress=None) -> {"metrics": {...}, "details": {...}}

``metrics`` is a flat ``{name: float}`` (the time series over versions, what a
model's thresholds compare); ``details`` is any JSON-serialisable breakdown.
``params`` are the validated request parameters plus what the worker adds (absolute
data paths, the ledger's edits for ``retention``); bad params raise ``ValueError``.
A suite leaves the model unchanged and is deterministic for given weights.

Modules load on first use, so a worker that never runs ``downstream`` never
imports lm-eval. The service keeps the same five names with their parameter
schemas (:mod:`service.suites`); a test checks both agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Suite(Protocol):
    def __call__(
        self,
        model: Any,
        tok: Any,
        params: Mapping[str, Any],
        *,
        progress: Callable[[float, str], None] | None = None,
    ) -> dict[str, Any]: ...


SUITES: dict[str, str] = {
    "counterfact": "workers.evaluation.counterfact:run_suite",
    "zsre": "workers.evaluation.zsre:run_suite",
    "retention": "workers.evaluation.retention:run_suite",
    "downstream": "workers.evaluation.downstream:run_suite",
    "fluency": "workers.evaluation.fluency:run_suite",
}


def load_suite(name: str) -> Suite:
    """The suite function registered as ``name`` (imports its module now)."""
    try:
        path = SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
