"""The ``retention`` suite: how many of the edits applied so far the model still holds.

Gradual forgetting under sequential editing (Gupta et al. 2024, "Model Editing at
Scale leads to Gradual and Catastrophic Forgetting") shows first as earlier edits
fading. Each edit is re-scored on its own rewrite prompt ``prompt.format(subject)``:
it is retained when its new object still beats the object it replaced,
lp(target_new) > lp(target_true) strictly, with lp the mean per-token
log-probability of ``" " + object`` (:mod:`workers.evaluation.scoring`; the
efficacy criterion of CounterFact).

Params: ``edits`` — ``[{"edit_id", "prompt", "subject", "target_new",
"target_true"}, …]`` in the order they were applied (the worker fills them from the
ledger: every edit on the evaluated version's chain); ``limit`` — score an evenly
spaced sample of at most that many (the first and the last included), so that old
and recent edits are both represented.

Metrics: ``retention`` (fraction retained; 1.0 with no edits to score: nothing was
forgotten) and ``count`` (edits scored). Details: ``forgotten`` (edit ids),
``unscored`` (ids without a target_true to compare with) and per edit its two
log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from workers.evaluation.scoring import paired_target_logprobs

_CHUNK = 256


def spaced_sample(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items at evenly spaced positions, first and last included."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if limit == 1:
        return [items[-1]]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def run_suite(
    model: Any,
    tok: Any,
    params: Mapping[str, Any],
    *,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Retention of ``params["edits"]`` (see the module docstring)."""
    edits = params.get("edits")
    if edits is None:
        raise ValueError("retention needs edits (the worker fills them from the ledger)")
    limit = params.get("limit")
    chosen = spaced_sample(list(edits), None if limit is None else int(limit))
    scorable, unscored = [], []
    for i, e in enumerate(chosen):
        try:
            edit_id, prompt, subject = e["edit_id"], str(e["prompt"]), str(e["subject"])
            new = str(e["target_new"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"edit {i} lacks field {exc}") from None
        if prompt.count("{}") != 1:
            raise ValueError(f"edit {edit_id}: prompt needs exactly one {{}} for the subject")
        if not e.get("target_true"):
            unscored.append(edit_id)
            continue
        scorable.append((edit_id, prompt.replace("{}", subject), new, str(e["target_true"])))
    per_edit: list[dict[str, Any]] = []
    for start in range(0, len(scorable), _CHUNK):
        chunk = scorable[start : start + _CHUNK]
        pairs = paired_target_logprobs(
            model, tok, [c[1] for c in chunk], [c[2] for c in chunk], [c[3] for c in chunk]
        )
        for (edit_id, _, _, _), (lp_new, lp_true) in zip(chunk, pairs, strict=True):
            per_edit.append({"edit_id": edit_id, "lp_new": lp_new, "lp_true": lp_true})
        if progress is not None:
            done = start + len(chunk)
            progress(done / len(scorable), f"re-scored {done} of {len(scorable)} edits")
    forgotten = [r["edit_id"] for r in per_edit if not r["lp_new"] > r["lp_true"]]
    count = len(per_edit)
    return {
        "metrics": {
            "retention": 1.0 - len(forgotten) / count if count else 1.0,
            "count": float(count),
        },
        "details": {"forgotten": forgotten, "unscored": unscored, "edits": per_edit},
    }
