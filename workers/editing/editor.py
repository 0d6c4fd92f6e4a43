"""The editor interface (STYLE.md §2): what every editing method declares, and the one
way its :class:`~workers.editing.types.WeightDelta` is built.

A method subclasses :class:`Editor`: it sets ``name`` and ``hparams_cls``, declares its
capabilities as class attributes and implements :meth:`Editor._compute`. The base's
:meth:`Editor.compute_delta` does what every method needs around that, once: it checks
the requests and the hparams' type, times the computation, reports progress 1.0, logs
one line (under the method's module) and builds the ``WeightDelta`` (the method id,
the parts, the seconds).

Capabilities, read by the worker as plain attributes:

- ``max_requests_per_delta``: the most requests one delta takes (ROME: 1, so several
  are applied one after another, one version each); None: any batch.
- ``uses_statistics``: its edits read the layer statistics C (``ctx.second_moment``)
  when ``hparams.mom2_adjustment`` is set, so the caller gives the context a
  statistics provider (and the worker computes C at start-up).
- ``prepares``: :meth:`Editor.prepare` builds per-layer caches (factorisations of C,
  null-space bases) ahead of the first edit; without it ``prepare`` does nothing.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, final

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError
from workers.editing.hparams import MethodHParams
from workers.editing.types import EditContext, EditRequest, ModuleState, Update, WeightDelta

H = TypeVar("H", bound=MethodHParams)


@dataclass
class DeltaParts:
    """What a method's :meth:`Editor._compute` found; the base makes it a WeightDelta."""

    summary: str  # the log line after the method id, e.g. "3 requests, layers [3, 4]: …"
    meta: dict[str, Any]
    updates: list[Update] = field(default_factory=list)
    aux_factors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, ModuleState] = field(default_factory=dict)


class Editor(ABC, Generic[H]):
    """One editing method. ``compute_delta`` hands the model back bit-identical."""

    name: ClassVar[str]  # the method id: the same in the API, the hparams and the metrics
    hparams_cls: ClassVar[type[MethodHParams]]
    max_requests_per_delta: ClassVar[int | None] = None
    uses_statistics: ClassVar[bool] = False
    prepares: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = cls.prepare is not Editor.prepare
        if cls.prepares != overridden:
            raise TypeError(
                f"{cls.__name__}: prepares={cls.prepares} but prepare is "
                f"{'' if overridden else 'not '}overridden"
            )

    def prepare(self, model: PreTrainedModel, hparams: H, ctx: EditContext) -> None:
        """Build in ``ctx.cache`` what the first edit with ``hparams`` would otherwise
        pay for; the worker calls it at start-up for the default hparams of editors
        that declare ``prepares``. The base builds nothing."""

    @final
    def compute_delta(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: MethodHParams,
        ctx: EditContext,
    ) -> WeightDelta:
        """The delta that makes ``model`` answer ``requests``; the model comes back
        unchanged. :class:`EditError` for requests or hparams the method cannot run."""
        self._check_requests(requests)
        if not isinstance(hparams, self.hparams_cls):
            raise EditError(
                f"{self.name} needs {self.hparams_cls.__name__}, got {type(hparams).__name__}"
            )
        started = time.perf_counter()
        parts = self._compute(model, tok, requests, hparams, ctx)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
        ctx.progress(1.0, "done")
        # logged under the method's module, e.g. workers.editing.memit
        log = logging.getLogger(type(self).__module__)
        log.info("%s %s, %.2fs", self.name, parts.summary, seconds)
        return WeightDelta(
            method=self.name,
            updates=parts.updates,
            aux_factors=parts.aux_factors,
            modules=parts.modules,
            meta={**parts.meta, "seconds": round(seconds, 3)},
        )

    @abstractmethod
    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: H,
        ctx: EditContext,
    ) -> DeltaParts:
        """The method itself, on checked requests and hparams of ``hparams_cls``."""

    def _check_requests(self, requests: Sequence[EditRequest]) -> None:
        if not requests:
            raise EditError("no edit requests given")
        limit = self.max_requests_per_delta
        if limit is not None and len(requests) > limit:
            at_a_time = "one request" if limit == 1 else f"{limit} requests"
            raise EditError(
                f"{self.name} edits {at_a_time} at a time (got {len(requests)}); "
                "apply several requests one after another, or use MEMIT for a batch"
            )
