"""The guard's decision: accept or reject a staged update before it is committed.

Gupta et al. 2024 ("Model editing at scale leads to gradual and catastrophic
forgetting"; "Rebuilding ROME") found *disabling edits*: single updates whose norm
is orders of magnitude above the normal ones, after which the model babbles and
loses its earlier edits. Three rules catch them, each configurable per model
(:class:`service.settings.GuardPolicy`, docs/guard.md):

1. **norm**: the update's Frobenius norm per request, ‖ΔW‖_F / √n for a batch of n
   requests, above ``norm_factor`` × the median of the same quantity over the model's
   latest ``norm_window`` accepted updates of the same method. The rule waits for
   ``norm_min_history`` such updates. Per method, because methods differ in scale
   (ROME's rank-one update on one layer, MEMIT's spread over five); per request with
   √n, because a batch of n roughly independent requests has a norm ~√n times one
   request's (the factors' columns are nearly orthogonal), so that batches of
   different sizes share one history. A method that changes no weights (GRACE: its
   delta is a codebook, ``ModuleState`` only) has norm 0: the rule does not apply.
2. **perplexity**: the canary perplexity after / before above ``perplexity_ratio``
   (a non-finite perplexity after the update is collapse too).
3. **recall**: of the sampled earlier edits the model recalled before the update,
   the fraction it no longer recalls above ``recall_drop``; applies once at least
   ``recall_min_edits`` were recalled. Edits about a subject of the update itself are
   left out (overwriting them is the update's purpose).

Pure functions over numbers: the worker (``workers/guarding.py``) reads the history
and the sample from the ledger and measures the canaries.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.settings import GuardPolicy
from workers.evaluation.canary import CanaryMeasurement


def norm_per_request(update_norm: float, n_requests: int) -> float:
    """‖ΔW‖_F / √n: the norm the history compares (see the module doc)."""
    if n_requests < 1:
        raise ValueError("an update applies at least one request")
    return update_norm / math.sqrt(n_requests)


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard decided and every number it decided on.

    ``rules`` names the rules that rejected (empty when accepted); ``reason`` says
    why in words (None when accepted); ``numbers`` holds the measurements, the rules
    that were skipped and why, and the settings used.
    """

    accepted: bool
    reason: str | None
    rules: tuple[str, ...]
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "rules": list(self.rules),
            **self.numbers,
        }


def _norm_rule(
    update_norm: float, n_requests: int, history: Sequence[float], policy: GuardPolicy
) -> tuple[str | None, dict[str, Any]]:
    per_request = norm_per_request(update_norm, n_requests)
    recent = [h for h in history if h > 0][-policy.norm_window :]
    numbers: dict[str, Any] = {
        "update_norm": update_norm,
        "n_requests": n_requests,
        "norm_per_request": per_request,
        "norm_history": len(recent),
        "norm_median": None,
        "norm_ratio": None,
        "norm_rule": "applied",
    }
    if not math.isfinite(update_norm):
        return "the update norm is not finite", numbers
    if update_norm == 0:
        numbers["norm_rule"] = "skipped: the update changes no weights"
        return None, numbers
    if len(recent) < policy.norm_min_history:
        numbers["norm_rule"] = (
            f"skipped: {len(recent)} accepted updates of the method, "
            f"the rule needs {policy.norm_min_history}"
        )
        return None, numbers
    median = statistics.median(recent)
    ratio = per_request / median
    numbers.update(norm_median=median, norm_ratio=ratio)
    if ratio > policy.norm_factor:
        return (
            f"update norm per request {per_request:.4g} is {ratio:.3g}× the running median "
            f"{median:.4g} of {len(recent)} accepted updates (limit {policy.norm_factor:g}×)"
        ), numbers
    return None, numbers


def _perplexity_rule(
    before: CanaryMeasurement, after: CanaryMeasurement, policy: GuardPolicy
) -> tuple[str | None, dict[str, Any]]:
    ratio = after.perplexity / before.perplexity if before.perplexity > 0 else math.inf
    if math.isnan(ratio):
        ratio = math.inf
    numbers = {
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "perplexity_ratio": ratio,
        "perplexity_tokens": after.tokens,
    }
    if ratio > policy.perplexity_ratio:
        return (
            f"canary perplexity rose from {before.perplexity:.4g} to {after.perplexity:.4g} "
            f"({ratio:.3g}×, limit {policy.perplexity_ratio:g}×)"
        ), numbers
    return None, numbers


def _recall_rule(
    before: CanaryMeasurement,
    after: CanaryMeasurement,
    exclude: Collection[int],
    policy: GuardPolicy,
) -> tuple[str | None, dict[str, Any]]:
    keys = sorted(k for k in before.recall if k in after.recall and k not in exclude)
    recalled = [k for k in keys if before.recall[k]]
    lost = [k for k in recalled if not after.recall[k]]
    numbers: dict[str, Any] = {
        "recall_edits": len(keys),
        "recall_before": (sum(before.recall[k] for k in keys) / len(keys)) if keys else None,
        "recall_after": (sum(after.recall[k] for k in keys) / len(keys)) if keys else None,
        "recall_recalled": len(recalled),
        "recall_lost": lost,
        "recall_lost_fraction": (len(lost) / len(recalled)) if recalled else None,
        "recall_rule": "applied",
    }
    if len(recalled) < policy.recall_min_edits:
        numbers["recall_rule"] = (
            f"skipped: {len(recalled)} sampled edits recalled before, "
            f"the rule needs {policy.recall_min_edits}"
        )
        return None, numbers
    fraction = len(lost) / len(recalled)
    if fraction > policy.recall_drop:
        return (
            f"the update made the model lose {len(lost)} of {len(recalled)} earlier edits "
            f"it recalled ({fraction:.0%}, limit {policy.recall_drop:.0%})"
        ), numbers
    return None, numbers


def decide(
    *,
    update_norm: float,
    n_requests: int,
    history: Sequence[float],
    before: CanaryMeasurement,
    after: CanaryMeasurement,
    policy: GuardPolicy,
    exclude: Collection[int] = (),
) -> GuardVerdict:
    """Accept or reject a staged update.

    ``update_norm`` is ‖ΔW‖_F of the update (0 for a method that changes no weights),
    ``n_requests`` its batch size, ``history`` the norms per request
    (:func:`norm_per_request`) of the model's accepted updates of the same method,
    oldest first; ``before``/``after`` the canary on the parent version and on the
    staged update; ``exclude`` the recall keys to leave out. Every rule is evaluated
    (all numbers are reported); the update is rejected if any rule rejects.
    """
    reasons: dict[str, str] = {}
    numbers: dict[str, Any] = {}
    for name, (reason, part) in (
        ("norm", _norm_rule(update_norm, n_requests, history, policy)),
        ("perplexity", _perplexity_rule(before, after, policy)),
        ("recall", _recall_rule(before, after, exclude, policy)),
    ):
        numbers.update(part)
        if reason is not None:
            reasons[name] = reason
    numbers["policy"] = policy.model_dump(mode="json")
    if reasons:
        return GuardVerdict(
            accepted=False,
            reason="rejected by the guard: " + "; ".join(reasons.values()),
            rules=tuple(reasons),
            numbers=numbers,
        )
    return GuardVerdict(accepted=True, reason=None, rules=(), numbers=numbers)
