"""The guard's canary: a cheap health check of a model version (pure torch).

Two measurements, both taken on the version before an edit and on the staged edit:

- **perplexity** of a few of the fluency suite's fixed texts (the first
  ``n`` of ``data/fluency_texts.json``, token-weighted:
  :func:`workers.evaluation.fluency.perplexity`). A disabling edit makes ordinary
  text far less probable (Gupta et al. 2024).
- **recall** of a sample of earlier edits: for each, whether ``target_new`` still
  beats ``target_true`` on its rewrite prompt (mean per-token log-probability, the
  CounterFact efficacy indicator of ../shared/data/README.md), scored in batches
  with :func:`workers.evaluation.scoring.paired_target_logprobs`. A disabling edit
  makes the model lose the earlier edits.

With the defaults (4 texts, 16 edits: :class:`service.settings.GuardPolicy`) each
part is one batched forward pass; the guard's cost per edit is in docs/guard.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.evaluation.fluency import fixed_texts, perplexity_of, token_nll
from workers.evaluation.scoring import paired_target_logprobs


@dataclass(frozen=True)
class RecallCase:
    """One earlier edit to re-score: ``prompt`` is the full rewrite prompt (subject
    filled in); ``key`` identifies it (the ledger's edit id)."""

    key: int
    prompt: str
    target_new: str
    target_true: str


@dataclass(frozen=True)
class CanaryMeasurement:
    """The canary of one model state: perplexity over ``tokens`` predicted tokens,
    and per recall case key whether target_new still beats target_true."""

    perplexity: float
    tokens: int
    recall: Mapping[int, bool] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "recall": {str(k): v for k, v in sorted(self.recall.items())},
            "seconds": self.seconds,
        }


def canary_texts(n: int) -> list[str]:
    """The first ``n`` fixed fluency texts (the canary's text set)."""
    texts = fixed_texts()
    if not 1 <= n <= len(texts):
        raise ValueError(f"the canary takes 1 to {len(texts)} texts, not {n}")
    return list(texts[:n])


def measure_recall(
    model: torch.nn.Module, tok: Any, cases: Sequence[RecallCase], batch_size: int = 64
) -> dict[int, bool]:
    """Per case: lp(prompt, target_new) > lp(prompt, target_true) (strict, as efficacy)."""
    if not cases:
        return {}
    pairs = paired_target_logprobs(
        model,
        tok,
        [c.prompt for c in cases],
        [c.target_new for c in cases],
        [c.target_true for c in cases],
        batch_size=batch_size,
    )
    return {c.key: new > true for c, (new, true) in zip(cases, pairs, strict=True)}


def measure(
    model: torch.nn.Module,
    tok: Any,
    texts: Sequence[str],
    cases: Sequence[RecallCase] = (),
) -> CanaryMeasurement:
    """Perplexity of ``texts`` (one batch) and the recall of ``cases``."""
    t0 = time.perf_counter()
    pairs = token_nll(model, tok, texts, batch_size=max(1, len(texts)))
    recall = measure_recall(model, tok, cases)
    return CanaryMeasurement(
        perplexity=perplexity_of(pairs),
        tokens=sum(n for _, n in pairs),
        recall=recall,
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class Before:
    """The canary of the parent version ``version`` over the recall sample ``cases``;
    ``seconds`` spent measuring now (0 when everything was cached)."""

    version: int
    measurement: CanaryMeasurement
    cases: tuple[RecallCase, ...]
    seconds: float


class CanaryCache:
    """The canary of one version, measured once: a run of edits measures each version
    once, because the canary measured on a committed update becomes the next update's
    "before" (:meth:`committed`), and only recall cases that enter the sample later
    are scored anew. The worker's guard and the benchmarks' guard both keep one."""

    def __init__(self, n_texts: int) -> None:
        self.texts = canary_texts(n_texts)
        self._version: int | None = None
        self._base: CanaryMeasurement | None = None
        self._recall: dict[int, bool] = {}

    def before(
        self, model: torch.nn.Module, tok: Any, version: int, cases: Sequence[RecallCase]
    ) -> Before:
        """The canary of ``version`` (the model's current state) over ``cases``."""
        t0 = time.perf_counter()
        if self._base is None or self._version != version:
            self._base = measure(model, tok, self.texts)
            self._version, self._recall = version, {}
        missing = [c for c in cases if c.key not in self._recall]
        self._recall.update(measure_recall(model, tok, missing))
        measurement = CanaryMeasurement(
            perplexity=self._base.perplexity,
            tokens=self._base.tokens,
            recall={c.key: self._recall[c.key] for c in cases},
        )
        return Before(version, measurement, tuple(cases), time.perf_counter() - t0)

    def after(self, model: torch.nn.Module, tok: Any, prior: Before) -> CanaryMeasurement:
        """The canary of the staged update the model holds, over ``prior``'s cases."""
        return measure(model, tok, self.texts, prior.cases)

    def committed(self, number: int, after: CanaryMeasurement) -> None:
        """The update measured as ``after`` became version ``number``."""
        self._version = number
        self._base = CanaryMeasurement(after.perplexity, after.tokens)
        self._recall = dict(after.recall)
