"""bench/forgetting.py on a tiny random LLaMA: sequential rome_original / MEMIT edits
end to end with retention, update norms and drift at every checkpoint, the pluggable
evaluation step, a guard that rejects (the delta discarded, the model as if the edit
had never been asked for), the plots and the table.

The records are bench/sequential's test records (words of the tiny vocabulary);
nothing is read from ../shared/data.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.forgetting import (
    GuardUnavailable,
    edit_norms,
    load_evaluation,
    load_guard,
    load_logs,
    macro_score,
    main,
    rejected_edits,
    run_forgetting,
    summary,
)
from tests.bench.test_sequential import RECORDS, _overrides, _request
from tests.tiny_models import tiny_model, word_tokenizer
from workers.editing.common.stats import StatsCache
from workers.evaluation.scoring import counterfact_scores
from workers.models.profiles import profile_for

TEXTS = ["The capital city of Toyota", "The native language of Picasso", "The music of Mozart"]


def _run(method: str, out: Path, tmp: Path, records=RECORDS, **kw):
    model, tok = tiny_model("llama"), word_tokenizer()
    log = run_forgetting(
        model, tok, records, method, out, every=2,
        stats_cache=StatsCache(tmp / "stats", "tiny-llama"), overrides=_overrides(method), **kw,
    )  # fmt: skip
    return model, tok, log


def _edited(model) -> dict[str, torch.Tensor]:
    profile = profile_for(model)
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if name in {profile.mlp_out_param(i) for i in range(model.config.num_hidden_layers)}
    }


def mean_logprob(model: torch.nn.Module, tok: Any) -> dict[str, Any]:
    """A real (small) evaluation: the mean next-token log-probability of TEXTS."""
    values = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            values.append(float(logp.gather(-1, ids[0, 1:, None]).mean()))
    return {"metrics": {"macro_logprob": statistics.mean(values)}, "details": {"texts": TEXTS}}


def test_rome_original_run_logs_retention_norms_drift_and_plots(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    model, tok, log = _run("rome_original", out, tmp_path)
    assert log["run"] == "rome_original-b1-n6" and log["bench"] == "forgetting"
    assert log["status"] == "complete" and not log["guarded"]
    assert "baseline_evaluation" not in log  # retention only: no evaluation step given
    ckpts = log["checkpoints"]
    assert [c["edits"] for c in ckpts] == [2, 4, 6]
    # one delta per record, each with its norm, in record order
    norms = edit_norms(log)
    assert [x for x, _, _ in norms] == [1, 2, 3, 4, 5, 6]
    assert all(ok and n > 0 and n == n for _, n, ok in norms)
    assert rejected_edits(log) == []
    layer = profile_for(model).mlp_out_param(log["hparams"]["layers"][0])
    assert all(set(c["drift"]) == {layer} and c["drift"][layer] > 0 for c in ckpts)
    assert all("evaluation" not in c for c in ckpts)
    # retention as plain CounterFact scoring of the final model says
    holding = [counterfact_scores(model, tok, _request(r))["efficacy"] for r in RECORDS]
    assert ckpts[-1]["retention"] == pytest.approx(statistics.mean(holding))
    assert sorted(ckpts[-1]["forgotten_case_ids"]) == [
        r["case_id"] for r, h in zip(RECORDS, holding, strict=True) if h == 0.0
    ]
    s = summary(log)
    assert s["edits"] == 6 and s["rejected"] == [] and s["norm_max"] == max(n for _, n, _ in norms)

    main(["--plot-only", "--table", "--out", str(out)])
    printed = capsys.readouterr().out
    files = [Path(line.removeprefix("wrote ")) for line in printed.splitlines()
             if line.startswith("wrote ")]  # fmt: skip
    assert files == [out / "forgetting.png", out / "drift.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    rows = [line for line in printed.splitlines() if line.startswith("| rome_original")]
    assert len(rows) == 1 and "| 6/6 | 0 |" in rows[0]
    assert [g["run"] for g in load_logs(out)] == ["rome_original-b1-n6"]


def test_evaluation_runs_on_the_unedited_model_and_at_every_checkpoint(tmp_path: Path) -> None:
    base = tiny_model("llama")
    model, tok, log = _run("memit", tmp_path / "out", tmp_path, evaluate=mean_logprob)
    assert log["baseline_evaluation"] == mean_logprob(base, word_tokenizer())
    ckpts = log["checkpoints"]
    assert all(c["evaluation"]["metrics"].keys() == {"macro_logprob"} for c in ckpts)
    assert ckpts[-1]["evaluation"] == mean_logprob(model, tok)  # the model at the end
    assert macro_score(ckpts[-1]["evaluation"]) != macro_score(log["baseline_evaluation"])
    assert len(edit_norms(log)) == 6 and all(ok for _, _, ok in edit_norms(log))  # batch 1


class NormGuard:
    """A real rule (no canary): reject a delta whose norm exceeds ``limit``; records
    what the loop hands it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.before_calls: list[tuple[int, list[int]]] = []
        self.histories: list[list[tuple[float, int]]] = []

    def before(self, model, tok, version: int, applied, group) -> None:
        self.before_calls.append((version, [r["case_id"] for r in applied]))

    def decide(self, model, tok, staged, group, history) -> dict[str, Any]:
        self.histories.append(list(history))
        ok = staged.update_norm <= self.limit
        return {"accepted": ok, "reason": None if ok else f"norm above {self.limit}"}


def test_guard_rejections_are_discarded_as_if_never_asked(tmp_path: Path) -> None:
    _, _, plain = _run("rome_original", tmp_path / "plain", tmp_path)
    norms = [n for _, n, _ in edit_norms(plain)]
    guard = NormGuard(statistics.median(norms))
    model, _, log = _run("rome_original", tmp_path / "guarded", tmp_path, guard=guard)
    assert log["run"] == "rome_original-b1-n6-guard" and log["guarded"]
    verdicts = [v for b in log["batches"] for v in b["guard"]]
    assert [v["case_ids"] for v in verdicts] == [[r["case_id"]] for r in RECORDS]
    rejected = [v["case_ids"][0] for v in verdicts if not v["accepted"]]
    accepted = [v["case_ids"][0] for v in verdicts if v["accepted"]]
    assert rejected and accepted  # the limit splits them
    assert all(v["update_norm"] > guard.limit for v in verdicts if not v["accepted"])
    assert all("norm above" in r["reason"] for b in log["batches"] for r in b["rejected"])
    assert [x for x, _, ok in edit_norms(log) if not ok] == rejected_edits(log)
    applied = [c for b in log["batches"] for c in b["applied"]]
    assert applied == accepted
    # the guard saw the accepted deltas so far, and the records applied so far
    for i, history in enumerate(guard.histories):
        earlier = [v for v in verdicts[:i] if v["accepted"]]
        assert history == [(v["update_norm"], 1) for v in earlier]
        assert guard.before_calls[i] == (len(earlier), [v["case_ids"][0] for v in earlier])
    assert set(log["checkpoints"][-1]["forgotten_case_ids"]) <= set(accepted)
    # the model is exactly what the accepted records alone make of it
    only = [r for r in RECORDS if r["case_id"] in accepted]
    alone, _, _ = _run("rome_original", tmp_path / "alone", tmp_path, records=only)
    mine, theirs = _edited(model), _edited(alone)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_missing_evaluation_or_guard_is_reported(tmp_path: Path) -> None:
    evaluate, reason = load_evaluation("workers.evaluation.no_such_suite:run_suite")
    assert evaluate is None and "workers.evaluation.no_such_suite" in reason
    evaluate, reason = load_evaluation("workers.evaluation.scoring:no_such_function")
    assert evaluate is None and "no_such_function" in reason
    with pytest.raises(GuardUnavailable, match="no_such_guard"):
        load_guard(modules=("workers.evaluation.no_such_guard", "workers.evaluation.scoring"))
    with pytest.raises(SystemExit, match="no forgetting-benchmark logs"):
        main(["--plot-only", "--out", str(tmp_path)])
