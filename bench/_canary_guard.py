"""The service's guard as a hook of ``bench/_editrun.py``'s loop, and the report of
its decisions (issue 4: false rejections on ordinary edits, catch rate on the
updates that collapse the model).

:class:`CanaryGuard` runs the canary of ``workers.evaluation.canary`` (perplexity of
the first ``canary_texts`` fixed fluency texts, recall of a sample of earlier edits)
on the current version and on the staged update, and the guard's decision
(``workers.evaluation.guard_rules.decide``) under a ``service.settings.GuardPolicy``, as
the worker does (``workers/jobs/guard.py``). It also measures a **probe** the guard
never sees: the perplexity of the *last* ``probe_texts`` fixed texts (disjoint from
the canary's), before and after each update. The probe is the independent judge of
whether an update collapsed the model, so that the catch rate is not the canary
grading itself.

``guard_report`` counts, over a run's verdicts, the updates that **collapse** the
model and those the guard flagged. Issue 4 defines collapse as the downstream macro
score or the canary perplexity degraded by more than half; ``judge="canary"`` (the
default) follows it: the canary perplexity more than doubled by the update, or the
update is the largest-norm one of a checkpoint window over which the downstream
macro score fell below half of the previous checkpoint's. As the guard's own
perplexity rule reads the same canary, ``judge="probe"`` swaps the canary for the
probe: an independent judge. Flagged updates that collapse are caught; flagged
updates that do not are false rejections.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bench._editrun import GuardHook, request_of
from workers.runtime import Staged

GUARD_MODULES = ("workers.evaluation.guard_rules", "workers.evaluation.canary")
COLLAPSE_RATIO = 2.0  # perplexity after / before above this: collapsed
MACRO_DROP = 0.5  # downstream macro below this × the previous checkpoint's: collapsed


class GuardUnavailable(RuntimeError):
    pass


def _subject(rec: dict[str, Any]) -> str:
    return " ".join(rec["requested_rewrite"]["subject"].split()).casefold()


class CanaryGuard:
    """:class:`bench._editrun.GuardHook` over the service's guard (the module
    docstring): the canary cached per version as the worker caches it
    (``workers.evaluation.canary.CanaryCache``), the decision of
    ``workers.evaluation.guard_rules.decide``; ``probe_texts`` 0 turns the probe off."""

    def __init__(
        self,
        guard: Any,
        canary: Any,
        policy: Any,
        *,
        probe_texts: int = 4,
    ) -> None:
        from workers.evaluation.fluency import fixed_texts, perplexity  # noqa: PLC0415

        self._guard, self._canary, self._policy = guard, canary, policy
        self._cache = canary.CanaryCache(policy.canary_texts)
        self._recall_sample = policy.canary_edits
        everything = list(fixed_texts())
        n_canary = len(self._cache.texts)
        if probe_texts and n_canary + probe_texts > len(everything):
            raise ValueError(
                f"{n_canary} canary and {probe_texts} probe texts overlap: "
                f"there are {len(everything)} fixed texts"
            )
        self._probe = everything[len(everything) - probe_texts :] if probe_texts else []
        self._perplexity = perplexity
        self._prior: Any = None
        # the probe of the current version and of the last staged one: (version, perplexity)
        self._probe_current: tuple[int, float | None] | None = None
        self._probe_staged: tuple[int, float | None] | None = None
        self._staged_after: tuple[int, Any] | None = None

    def _sample(
        self, applied: Sequence[dict[str, Any]], group: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """At most ``canary_edits`` applied records, none about a subject of ``group``:
        those with the smallest md5(case_id), as the service samples by md5(edit id)
        (``service.ledger.edits.recall_candidates``: uniform over the history and
        stable as it grows, so that a version's cached recall is reused)."""
        if self._recall_sample == 0:
            return []
        subjects = {_subject(r) for r in group}
        ranked = sorted(
            (r for r in applied if _subject(r) not in subjects),
            key=lambda r: hashlib.md5(str(r["case_id"]).encode()).hexdigest(),
        )
        return sorted(ranked[: self._recall_sample], key=lambda r: r["case_id"])

    def _probe_ppl(self, model: torch.nn.Module, tok: Any) -> float | None:
        return self._perplexity(model, tok, self._probe) if self._probe else None

    def before(
        self,
        model: torch.nn.Module,
        tok: Any,
        version: int,
        applied: Sequence[dict[str, Any]],
        group: Sequence[dict[str, Any]] = (),
    ) -> None:
        """The canary of ``version`` over the recall sample, from what was measured on
        it when it was staged and, for the rest, measured now (as the service's
        ``workers.jobs.guard.LedgerGuard.before``)."""
        if self._staged_after is not None and self._staged_after[0] == version:
            # the committed update's "after" is this version's (observed or accepted)
            self._cache.committed(version, self._staged_after[1])
            self._probe_current = self._probe_staged
        if self._probe_current is None or self._probe_current[0] != version:
            self._probe_current = (version, self._probe_ppl(model, tok))
        cases = []
        for rec in self._sample(applied, group):
            req = request_of(rec)
            cases.append(self._canary.RecallCase(
                key=int(rec["case_id"]), prompt=req.text,
                target_new=req.target_new, target_true=str(req.target_true),
            ))  # fmt: skip
        self._prior = self._cache.before(model, tok, version, cases)

    def decide(
        self,
        model: torch.nn.Module,
        tok: Any,
        staged: Staged,
        group: Sequence[dict[str, Any]],
        history: Sequence[tuple[float, int]],
    ) -> dict[str, Any]:
        after = self._cache.after(model, tok, self._prior)
        verdict = self._guard.decide(
            update_norm=staged.update_norm,
            n_requests=len(group),
            history=[self._guard.norm_per_request(n, k) for n, k in history if n > 0],
            before=self._prior.measurement,
            after=after,
            policy=self._policy,
        )
        probe_after = self._probe_ppl(model, tok)
        self._staged_after = (staged.number, after)
        self._probe_staged = (staged.number, probe_after)
        out = {
            **verdict.to_json(),
            "canary_before": self._prior.measurement.to_json(),
            "canary_after": after.to_json(),
        }
        if self._probe:
            out["probe"] = {"before": self._probe_current[1], "after": probe_after}
        return out


def load_guard(
    policy: Mapping[str, Any] | None = None,
    *,
    modules: Sequence[str] = GUARD_MODULES,
    probe_texts: int = 4,
) -> GuardHook:
    """The service's guard as a :class:`GuardHook`; :class:`GuardUnavailable` (with
    the reason) when its modules are not in this checkout."""
    try:
        guard, canary = (importlib.import_module(m) for m in modules)
        settings = importlib.import_module("service.settings")
        policy_cls = settings.GuardPolicy
        for name in ("decide", "norm_per_request"):
            getattr(guard, name)
        for name in ("CanaryCache", "RecallCase"):
            getattr(canary, name)
    except (ImportError, AttributeError) as exc:
        raise GuardUnavailable(
            f"--guard needs the service's guard ({', '.join(modules)} and "
            f"service.settings.GuardPolicy; issue 4, item 3), which this checkout lacks: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return CanaryGuard(
        guard, canary, policy_cls.model_validate(dict(policy or {})), probe_texts=probe_texts
    )


def json_object(text: str) -> dict[str, Any]:
    """argparse type of ``--guard-policy`` and the like: a JSON object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


# -- the report -----------------------------------------------------------------------------


def _ratio(pair: Mapping[str, Any] | None) -> float | None:
    if not pair or not pair.get("before") or pair.get("after") is None:
        return None
    return float(pair["after"]) / float(pair["before"])


def _median_of(verdicts: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Median of a verdict field, over the verdicts that have it (older logs lack
    ``cpu_seconds``)."""
    values = [v[key] for v in verdicts if v.get(key) is not None]
    return statistics.median(values) if values else None


def _canary_ratio(v: Mapping[str, Any]) -> float | None:
    before = (v.get("canary_before") or {}).get("perplexity")
    return _ratio({"before": before, "after": (v.get("canary_after") or {}).get("perplexity")})


def guard_report(
    log: Mapping[str, Any],
    *,
    macro: Any = None,
    judge: str = "canary",
    collapse_ratio: float = COLLAPSE_RATIO,
    macro_drop: float = MACRO_DROP,
) -> dict[str, Any]:
    """The guard's decisions over a run's log against the collapses (module
    docstring): counts, and per flagged or collapsing update its numbers. ``macro``
    maps a checkpoint's ``evaluation`` to its macro score (None: the downstream test
    is left out)."""
    verdicts = [v for b in log["batches"] for v in b.get("guard", [])]
    if judge not in ("canary", "probe"):
        raise ValueError(f"judge is canary or probe, not {judge!r}")
    collapsed: dict[int, list[str]] = {}
    for i, v in enumerate(verdicts):
        r = _canary_ratio(v) if judge == "canary" else _ratio(v.get("probe"))
        if r is not None and r > collapse_ratio:
            collapsed.setdefault(i, []).append(f"{judge} perplexity ×{r:.2f}")
    if macro is not None:
        index = {}  # edit number of the last record of each verdict → verdict index
        pos = {c: k + 1 for k, c in enumerate(c for b in log["batches"] for c in b["case_ids"])}
        for i, v in enumerate(verdicts):
            index[max(pos[c] for c in v["case_ids"])] = i
        previous = macro(log.get("baseline_evaluation"))
        last = 0
        for ckpt in log["checkpoints"]:
            score = macro(ckpt.get("evaluation"))
            window = [i for e, i in index.items() if last < e <= ckpt["edits"]]
            if previous and score is not None and window and score < macro_drop * previous:
                worst = max(window, key=lambda i: verdicts[i]["update_norm"])
                collapsed.setdefault(worst, []).append(
                    f"downstream macro {previous:.3f} → {score:.3f} by edit {ckpt['edits']}"
                )
            previous, last = (score if score is not None else previous), ckpt["edits"]
    flagged = {i for i, v in enumerate(verdicts) if not v["accepted"]}
    ordinary = len(verdicts) - len(collapsed)
    false_rej = sorted(flagged - set(collapsed))
    caught = sorted(flagged & set(collapsed))
    norms = [v["update_norm"] for v in verdicts]

    def row(i: int) -> dict[str, Any]:
        v = verdicts[i]
        return {
            "case_ids": v["case_ids"],
            "update_norm": v["update_norm"],
            "flagged": i in flagged,
            "reason": v.get("reason"),
            "canary_ratio": _canary_ratio(v),
            "probe_ratio": _ratio(v.get("probe")),
            "collapse": collapsed.get(i, []),
        }

    return {
        "run": log["run"],
        "judge": judge,
        "updates": len(verdicts),
        "enforced": bool(verdicts) and all(v.get("enforced", True) for v in verdicts),
        "flagged": len(flagged),
        "collapsing": len(collapsed),
        "caught": len(caught),
        "ordinary": ordinary,
        "false_rejections": len(false_rej),
        "false_rejection_rate": len(false_rej) / ordinary if ordinary else None,
        "catch_rate": len(caught) / len(collapsed) if collapsed else None,
        "update_norm_median": statistics.median(norms) if norms else None,
        "guard_s_median": statistics.median(v["seconds"] for v in verdicts) if verdicts else None,
        "guard_cpu_s_median": _median_of(verdicts, "cpu_seconds"),
        "details": [row(i) for i in sorted(flagged | set(collapsed))],
    }


def report_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per run and judge the updates judged, flagged, collapsing, caught,
    and the false rejections among the ordinary ones."""
    lines = [
        "| run | guard | collapse judged by | updates | flagged | collapsing | caught (rate) "
        "| false rejections / ordinary (rate) | guard s/update (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        catch = "—" if r["catch_rate"] is None else f"{r['catch_rate']:.0%}"
        fr = "—" if r["false_rejection_rate"] is None else f"{r['false_rejection_rate']:.1%}"
        gs = "—" if r["guard_s_median"] is None else f"{r['guard_s_median']:.2f}"
        if r.get("guard_cpu_s_median") is not None:
            gs += f" ({r['guard_cpu_s_median']:.2f})"
        lines.append(
            f"| {r['run']} | {'enforce' if r['enforced'] else 'observe'} | {r['judge']} "
            f"| {r['updates']} "
            f"| {r['flagged']} | {r['collapsing']} | {r['caught']} ({catch}) "
            f"| {r['false_rejections']} / {r['ordinary']} ({fr}) | {gs} |"
        )
    return "\n".join(lines)
