"""The ``counterfact`` suite: efficacy, paraphrase and neighborhood scores of a model
on CounterFact records (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", §3 and appendix; definitions as ../shared/data/README.md states them).

For each record, with lp(p, o) the mean per-token log-probability of ``" " + o``
after prompt p (teacher forced, :mod:`workers.evaluation.scoring`):

- efficacy (ES): 1 if lp(rewrite, target_new) > lp(rewrite, target_true), strictly;
  the rewrite prompt is ``requested_rewrite.prompt.format(subject)``;
- paraphrase (PS): the mean of that indicator over ``paraphrase_prompts``;
- neighborhood (NS): the mean of lp(p, target_true) > lp(p, target_new) over
  ``neighborhood_prompts`` (the true object should still win there);
- the magnitude variants ``*_diff`` (EM/PM/NM): the mean of
  exp(lp_new) − exp(lp_true), swapped for neighborhood prompts.

Each is averaged over the records (PS and NS over the records that have such
prompts) and reported as a fraction in [0, 1] like the per-edit metrics (the
papers print ×100). ``score`` is the harmonic mean of ES, PS and NS, as ROME's
summary computes it. The scores of an unedited model say how often it already
prefers the counterfactual; after edits, they measure the edits themselves.

Params: ``records`` (a list of records) or ``data_path`` (an absolute JSONL path;
the worker resolves it), then ``offset`` and ``limit`` select records in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.evaluation.records import select_records
from workers.evaluation.scoring import paired_target_logprobs

# records scored per forward-pass group (progress is reported between groups)
_CHUNK = 64


@dataclass(frozen=True)
class Case:
    """One record's prompts and objects, ready to score."""

    case_id: Any
    rewrite: str
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]
    target_new: str
    target_true: str


def case_of(record: Mapping[str, Any], index: int) -> Case:
    """A record in CounterFact's schema as a :class:`Case`; ``ValueError`` naming the
    record (its position, and case_id when it has one) if a field is missing."""
    where = f"record {index}" + (f" (case_id {record['case_id']})" if "case_id" in record else "")
    try:
        rw = record["requested_rewrite"]
        prompt, subject = str(rw["prompt"]), str(rw["subject"])
        new, true = str(rw["target_new"]["str"]), str(rw["target_true"]["str"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where} lacks requested_rewrite field {exc}") from None
    if prompt.count("{}") != 1:
        raise ValueError(f"{where}: the rewrite prompt needs exactly one {{}} for the subject")
    if not new.strip() or not true.strip():
        raise ValueError(f"{where}: target_new and target_true must be non-empty")
    return Case(
        case_id=record.get("case_id", index),
        rewrite=prompt.replace("{}", subject),
        paraphrases=tuple(str(p) for p in record.get("paraphrase_prompts") or ()),
        neighborhood=tuple(str(p) for p in record.get("neighborhood_prompts") or ()),
        target_new=new,
        target_true=true,
    )


def read_records(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records ``params`` select (:func:`workers.evaluation.records.select_records`)."""
    return select_records(params, "counterfact")


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_cases(
    model: Any,
    tok: Any,
    cases: Sequence[Case],
    progress: Callable[[float, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per case: ``efficacy``, ``paraphrase``, ``neighborhood`` (None without such
    prompts) and their ``*_diff`` magnitudes."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(cases), _CHUNK):
        chunk = cases[start : start + _CHUNK]
        prompts: list[str] = []
        news: list[str] = []
        trues: list[str] = []
        for c in chunk:
            for p in (c.rewrite, *c.paraphrases, *c.neighborhood):
                prompts.append(p)
                news.append(c.target_new)
                trues.append(c.target_true)
        pairs = paired_target_logprobs(model, tok, prompts, news, trues)
        k = 0
        for c in chunk:
            groups = []
            for n in (1, len(c.paraphrases), len(c.neighborhood)):
                groups.append(pairs[k : k + n])
                k += n
            rw, pa, nb = groups
            out.append(
                {
                    "case_id": c.case_id,
                    "efficacy": _mean([float(n > t) for n, t in rw]),
                    "paraphrase": _mean([float(n > t) for n, t in pa]),
                    "neighborhood": _mean([float(t > n) for n, t in nb]),
                    "efficacy_diff": _mean([math.exp(n) - math.exp(t) for n, t in rw]),
                    "paraphrase_diff": _mean([math.exp(n) - math.exp(t) for n, t in pa]),
                    "neighborhood_diff": _mean([math.exp(t) - math.exp(n) for n, t in nb]),
                }
            )
        if progress is not None:
            done = min(start + _CHUNK, len(cases))
            progress(done / len(cases), f"scored {done} of {len(cases)} records")
    return out


_KEYS = (
    "efficacy",
    "paraphrase",
    "neighborhood",
    "efficacy_diff",
    "paraphrase_diff",
    "neighborhood_diff",
)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over records (of the records that have a value) and the harmonic-mean
    ``score`` of efficacy, paraphrase and neighborhood (0 if any is 0)."""
    metrics: dict[str, float] = {"count": float(len(rows))}
    for key in _KEYS:
        m = _mean([r[key] for r in rows if r[key] is not None])
        if m is not None:
            metrics[key] = m
    parts = [metrics.get(k) for k in ("efficacy", "paraphrase", "neighborhood")]
    present = [p for p in parts if p is not None]
    if present:
        metrics["score"] = (
            0.0 if min(present) <= 0 else len(present) / sum(1.0 / p for p in present)
        )
    return metrics


def run_suite(
    model: Any,
    tok: Any,
    params: Mapping[str, Any],
    *,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """CounterFact ES/PS/NS (and magnitudes, score, count) over the selected records;
    ``details.records`` holds each record's scores."""
    records = read_records(params)
    if not records:
        raise ValueError("no records selected (check offset and limit against the data)")
    cases = [case_of(r, i) for i, r in enumerate(records)]
    rows = score_cases(model, tok, cases, progress)
    return {"metrics": summarize(rows), "details": {"records": rows}}
