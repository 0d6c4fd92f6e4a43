"""The edit requests of a batch, as the edit job builds them from the ledger's rows:
the target_true a request without one is measured against, the earlier edit each one
supersedes (with the targets to suppress: docs/editing.md, "Supersede"), and the
metrics row recorded for each edit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from service.ledger import edits as ledger_edits
from service.ledger.tables import Edit
from workers.editing.types import EditRequest
from workers.evaluation.scoring import generate as greedy_generate
from workers.state import WorkerState

log = logging.getLogger(__name__)


def request_of(e: Edit) -> EditRequest:
    return EditRequest(
        prompt=e.prompt,
        subject=e.subject,
        target_new=e.target_new,
        target_true=e.target_true,
        paraphrase_prompts=tuple(e.paraphrase_prompts or ()),
        neighborhood_prompts=tuple(e.neighborhood_prompts or ()),
    )


Suppress = tuple[tuple[str, float], ...]


def find_superseded(state: WorkerState, group: Sequence[Edit]) -> dict[int, tuple[int, Suppress]]:
    """For each edit of ``group`` whose subject and prompt match an applied edit of
    the model (with the model's ``supersede`` policy ``auto``): that edit's id and the
    targets to suppress (docs/editing.md, "Supersede"): the old target, at most as
    likely as before it was edited in (its ``pre_`` log-probability on the prompt),
    and what the old edit suppressed in turn, but the new target itself."""
    if state.spec.supersede != "auto":
        return {}
    with state.ledger() as s:
        found = ledger_edits.active_matches(
            s, state.model_id, {(e.subject, e.prompt) for e in group}
        )
    out: dict[int, tuple[int, Suppress]] = {}
    for e in group:
        old = found.get((e.subject, e.prompt))
        if old is None or old.id == e.id:
            continue
        metrics = old.metrics or {}
        chain = [(str(a), float(c)) for a, c in metrics.get("suppressed") or []]
        try:
            chain.append((old.target_new, float(metrics["pre_logprobs"]["rewrite"]["new"][0])))
        except (KeyError, IndexError, TypeError):
            log.warning("edit %d supersedes edit %d, whose value before it is not recorded: its "
                        "target is not suppressed", e.id, old.id)  # fmt: skip
        kept = tuple((a, c) for a, c in dict(chain).items() if a != e.target_new)
        out[e.id] = (old.id, kept)
    return out


def with_target_true(state: WorkerState, req: EditRequest) -> tuple[EditRequest, bool]:
    """Metrics compare target_new with the true object. Without one, use what the
    unedited model says (its greedy continuation's first word) and flag it."""
    if req.target_true:
        return req, False
    rt = state.runtime
    text = greedy_generate(rt.model, rt.tokenizer, req.text, 6).strip()
    word = text.split()[0].strip(".,;:!?\"'()") if text.split() else ""
    return replace(req, target_true=word or "the"), True


def metrics_row(
    before: dict[str, Any], after: dict[str, Any], inferred_true: str | None
) -> dict[str, Any]:
    """An edit's metrics: the scores after the edit, ``pre_<name>`` before it, and the
    target_true inferred when the client gave none."""
    row: dict[str, Any] = dict(after)
    for key, value in before.items():
        row[f"pre_{key}"] = value
    if inferred_true is not None:
        row["target_true_inferred"] = inferred_true
    return row
