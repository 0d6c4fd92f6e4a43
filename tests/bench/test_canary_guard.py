"""bench/_canary_guard.py: the service's guard in the benchmark loop on a tiny random LLaMA.

Observe mode logs every verdict and applies every delta (the model ends as in the
unguarded run); the canary measured on an accepted update is the next update's
"before", as in the service; the recall sample is the md5-smallest applied records;
``guard_report`` counts flagged, collapsing, caught and falsely rejected updates.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from bench._canary_guard import guard_report, load_guard, report_table
from bench.forgetting import main, run_forgetting
from tests.bench.test_forgetting import NormGuard, _edited, _run
from tests.bench.test_sequential import RECORDS, _overrides
from tests.tiny_models import tiny_model, word_tokenizer
from workers.editing.common.stats import StatsCache


def test_observe_mode_logs_verdicts_and_applies_every_delta(tmp_path: Path) -> None:
    plain_model, _, plain = _run("rome_original", tmp_path / "plain", tmp_path)
    norms = [n for b in plain["batches"] for n in b["update_norms"]]
    guard = NormGuard(sorted(norms)[len(norms) // 2])
    model, _, log = _run(
        "rome_original", tmp_path / "observe", tmp_path, guard=guard, guard_enforce=False
    )
    assert log["run"] == "rome_original-b1-n6-observe" and log["guard_mode"] == "observe"
    assert not log["guarded"]
    verdicts = [v for b in log["batches"] for v in b["guard"]]
    assert [v["update_norm"] for v in verdicts] == norms
    flagged = [v for v in verdicts if not v["accepted"]]
    assert flagged and all(not v["enforced"] for v in verdicts)
    # nothing rejected: every record applied, the model as the unguarded run leaves it
    assert all(b["rejected"] == [] for b in log["batches"])
    assert [c for b in log["batches"] for c in b["applied"]] == [r["case_id"] for r in RECORDS]
    mine, theirs = _edited(model), _edited(plain_model)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the norm history holds the accepted updates only, as the service's median does
    for i, history in enumerate(guard.histories):
        assert history == [(v["update_norm"], 1) for v in verdicts[:i] if v["accepted"]]
    # and every record applied so far reaches the guard's "before", with the group
    assert [len(applied) for _, applied in guard.before_calls] == list(range(len(RECORDS)))
    assert all("guard_s" in b and b["guard_s"] >= 0 for b in log["batches"])
    # the guard's time is logged as wall and as CPU seconds of this process
    assert all(v["seconds"] >= 0 and v["cpu_seconds"] >= 0 for v in verdicts)


def test_canary_guard_reuses_the_accepted_update_and_samples_like_the_service(
    tmp_path: Path,
) -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    guard = load_guard({"canary_texts": 2, "canary_edits": 3}, probe_texts=2)
    log = run_forgetting(
        model, tok, RECORDS, "rome_original", tmp_path / "out", every=2, guard=guard,
        guard_enforce=False, stats_cache=StatsCache(tmp_path / "stats", "tiny-llama"),
        overrides=_overrides("rome_original"),
    )  # fmt: skip
    verdicts = [v for b in log["batches"] for v in b["guard"]]
    assert len(verdicts) == len(RECORDS)
    for prev, cur in zip(verdicts, verdicts[1:], strict=False):
        # the version the previous update made is measured once: its "after"
        assert cur["canary_before"]["perplexity"] == prev["canary_after"]["perplexity"]
        assert cur["probe"]["before"] == prev["probe"]["after"]
        for key, held in cur["canary_before"]["recall"].items():
            if key in prev["canary_after"]["recall"]:
                assert held == prev["canary_after"]["recall"][key]
    # the probe texts are not the canary's: their perplexities differ
    first = verdicts[0]
    assert first["probe"]["before"] != first["canary_before"]["perplexity"]
    # recall sample: the (at most 3) applied records with the smallest md5(case_id),
    # none about the subject being edited (records 1 and 2 are both about Picasso)
    for i, v in enumerate(verdicts):
        subject = RECORDS[i]["requested_rewrite"]["subject"]
        applied = [r["case_id"] for r in RECORDS[:i]
                   if r["requested_rewrite"]["subject"] != subject]  # fmt: skip
        md5 = sorted(applied, key=lambda c: hashlib.md5(str(c).encode()).hexdigest())
        assert sorted(int(k) for k in v["canary_after"]["recall"]) == sorted(md5[:3])
    report = guard_report(log)
    assert report["updates"] == len(RECORDS) and not report["enforced"]
    assert report["flagged"] == sum(not v["accepted"] for v in verdicts)


def _verdict(case: int, norm: float, accepted: bool, probe: tuple[float, float]) -> dict:
    return {
        "case_ids": [case], "update_norm": norm, "n_requests": 1, "accepted": accepted,
        "reason": None if accepted else "norm", "enforced": True, "seconds": 0.5,
        "cpu_seconds": 0.25,
        "canary_before": {"perplexity": 10.0}, "canary_after": {"perplexity": 10.0},
        "probe": {"before": probe[0], "after": probe[1]},
    }  # fmt: skip


def _evaluation(macro: float) -> dict[str, Any]:
    return {"metrics": {"macro_f1": macro}, "details": {}}


def test_guard_report_counts_catches_and_false_rejections() -> None:
    v = [
        _verdict(1, 10.0, True, (20.0, 21.0)),
        _verdict(2, 900.0, False, (21.0, 400.0)),  # collapses (probe ×19), caught
        _verdict(3, 11.0, False, (21.0, 22.0)),  # ordinary, flagged: a false rejection
        _verdict(4, 12.0, True, (22.0, 50.0)),  # collapses (probe ×2.3), missed
        _verdict(5, 13.0, True, (50.0, 51.0)),
        _verdict(6, 80.0, True, (51.0, 52.0)),  # the largest of a window where F1 halves
    ]
    log = {
        "run": "r",
        "baseline_evaluation": _evaluation(0.6),
        "batches": [{"case_ids": x["case_ids"], "guard": [x]} for x in v],
        "checkpoints": [
            {"edits": 4, "evaluation": _evaluation(0.5)},  # not halved
            {"edits": 6, "evaluation": _evaluation(0.2)},  # halved: update 6 collapses
        ],
    }
    from bench.forgetting import macro_score  # noqa: PLC0415

    r = guard_report(log, macro=macro_score, judge="probe")
    assert (r["updates"], r["flagged"], r["collapsing"], r["caught"]) == (6, 2, 3, 1)
    assert (r["ordinary"], r["false_rejections"]) == (3, 1)
    assert r["catch_rate"] == pytest.approx(1 / 3)
    assert r["false_rejection_rate"] == pytest.approx(1 / 3)
    assert [d["case_ids"] for d in r["details"]] == [[2], [3], [4], [6]]
    assert "downstream macro 0.500 → 0.200" in r["details"][3]["collapse"][0]
    # without the downstream test only the probe judges
    assert guard_report(log, judge="probe")["collapsing"] == 2
    row = report_table([r]).splitlines()[-1]
    assert row == "| r | enforce | probe | 6 | 2 | 3 | 1 (33%) | 1 / 3 (33.3%) | 0.50 (0.25) |"
    # the judge reads the canary: here it never moves, so only the downstream
    # drop collapses (update 6, accepted) and both flagged updates are false rejections
    c = guard_report(log, macro=macro_score)
    assert c["judge"] == "canary" and (c["collapsing"], c["caught"]) == (1, 0)
    assert (c["ordinary"], c["false_rejections"], c["catch_rate"]) == (5, 2, 0.0)
    log["batches"][1]["guard"][0]["canary_after"] = {"perplexity": 25.0}  # update 2: ×2.5
    c = guard_report(log, macro=macro_score)
    assert (c["collapsing"], c["caught"], c["false_rejections"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="judge"):
        guard_report(log, judge="oracle")


def test_guard_report_of_the_forgetting_logs(tmp_path: Path, capsys) -> None:
    guard = NormGuard(0.0)  # flags everything
    _run("rome_original", tmp_path / "out", tmp_path, guard=guard, guard_enforce=False)
    main(["--guard-report", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    for judge in ("canary", "probe"):
        assert f"| rome_original-b1-n6-observe | observe | {judge} | 6 | 6 | 0 | 0 (—) |" in printed
    assert (tmp_path / "out" / "guard.json").is_file()
