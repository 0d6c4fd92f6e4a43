"""bench/sequential.py on a tiny random LLaMA: the core loop with ROME and MEMIT for
three checkpoints, the JSON log, the plots, the table, --max-minutes and --resume.

The records are written here (words of the tiny vocabulary, the subject last, as the
tiny models need); nothing is read from ../shared/data.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench.sequential import (
    PLOTS,
    ResumeError,
    load_logs,
    main,
    plan_batches,
    progress,
    progress_table,
    run_sequential,
    summary,
    table,
)
from tests.tiny_models import TINY_OVERRIDES, tiny_model, word_tokenizer
from workers.editing.common.stats import StatsCache
from workers.editing.hparams import defaults_for
from workers.editing.types import EditRequest
from workers.evaluation.scoring import counterfact_scores
from workers.models.profiles import profile_for


def _record(case_id: int, prompt: str, subject: str, new: str, true: str, para: str, neigh: str):
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new},
            "target_true": {"str": true},
        },
        "paraphrase_prompts": [para],
        "neighborhood_prompts": [neigh],
    }


# records 1 and 2 share a subject: with batches of 2, record 2 waits for the second batch
RECORDS = [
    _record(1, "The native language of {}", "Picasso", "Russian", "Spanish",
            "The mother tongue of Picasso", "The native language of Dante"),
    _record(2, "The famous job of {}", "Picasso", "physics", "painting",
            "The known field of Picasso", "The famous job of Homer"),
    _record(3, "The capital city of {}", "Toyota", "Tokyo", "Athens",
            "The capital of Toyota", "The capital city of Nokia"),
    _record(4, "The famous writer {}", "Tolstoy", "Tolstoy", "Homer",
            "The known writer Tolstoy", "The famous writer Dante"),
    _record(5, "The music of {}", "Mozart", "piano", "guitar",
            "He plays the music of Mozart", "The music of Newton"),
    _record(6, "The field of {}", "Curie", "physics", "painting",
            "The known field of Curie", "The field of Einstein"),
]  # fmt: skip
N_CHECKPOINTS = 3  # 6 records, batches of 2, a checkpoint every 2 edits


def _overrides(method: str) -> dict:
    return {**TINY_OVERRIDES[method], "mom2_n_samples": 64, "mom2_sample_tokens": 16}


def _run(method: str, out: Path, tmp: Path, **kw):
    model, tok = tiny_model("llama"), word_tokenizer()
    log = run_sequential(
        model, tok, RECORDS, method, 2, out, every=2,
        stats_cache=StatsCache(tmp / "stats", "tiny-llama"), overrides=_overrides(method), **kw,
    )  # fmt: skip
    return model, tok, log


def _request(rec: dict) -> EditRequest:
    rw = rec["requested_rewrite"]
    return EditRequest(
        rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"],
        tuple(rec["paraphrase_prompts"]), tuple(rec["neighborhood_prompts"]),
    )  # fmt: skip


def test_plan_batches_keeps_order_and_defers_a_repeated_subject() -> None:
    ids = [[r["case_id"] for r in b] for b in plan_batches(RECORDS, 2)]
    assert ids == [[1, 3], [2, 4], [5, 6]]
    assert [[r["case_id"] for r in b] for b in plan_batches(RECORDS, 4)] == [[1, 3, 4, 5], [2, 6]]
    assert [[r["case_id"] for r in b] for b in plan_batches(RECORDS, 1)] == [
        [i] for i in range(1, 7)
    ]
    with pytest.raises(ValueError):
        plan_batches(RECORDS, 0)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_run_logs_every_checkpoint_and_plots(method: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    model, tok, log = _run(method, out, tmp_path)
    assert log == json.loads((out / f"{method}-b2-n6.json").read_text())
    assert log["status"] == "complete" and log["method"] == method and log["batch_size"] == 2
    assert [b["case_ids"] for b in log["batches"]] == [[1, 3], [2, 4], [5, 6]]
    layers = _overrides(method).get("layers", defaults_for(method, "llama", 4, 64).layers)
    assert log["hparams"]["layers"] == list(layers)
    # ROME: one delta per record; MEMIT: one per batch
    per_batch = 2 if method == "rome" else 1
    assert all(len(b["update_norms"]) == per_batch for b in log["batches"])
    assert all(x > 0 and x == x for b in log["batches"] for x in b["update_norms"])
    assert log["setup"]["warmup_s"] > 0 and log["setup"]["stats_s"] >= 0
    # the statistics used, by hash: one per edited layer, the same for both methods' layers
    stats = log["setup"]["stats_sha256"]
    assert sorted(stats) == sorted(f"model.layers.{i}.mlp.down_proj.weight" for i in layers)
    assert all(len(h) == 16 for h in stats.values()) and len(set(stats.values())) == len(stats)

    ckpts = log["checkpoints"]
    assert [c["edits"] for c in ckpts] == [2, 4, 6]
    assert [c["batches"] for c in ckpts] == [[0, 1], [1, 2], [2, 3]]
    profile = profile_for(model)
    edited = {profile.mlp_out_param(layer) for layer in log["hparams"]["layers"]}
    applied = []
    for c, b in zip(ckpts, log["batches"], strict=True):
        applied += b["applied"]
        assert set(c["drift"]) == edited and all(v > 0 for v in c["drift"].values())
        assert c["s_per_edit"] == pytest.approx(b["compute_s"] / 2)
        assert (
            c["cpu_s_per_edit"] == pytest.approx(b["compute_cpu_s"] / 2) and b["compute_cpu_s"] > 0
        )
        assert c["eval_s"] > 0 and c["peak_rss_gb"] > 0
        assert c["update_norm_max"] == max(b["update_norms"])
        assert set(c["forgotten_case_ids"]) <= set(applied)
        assert c["retention"] == pytest.approx(1 - len(c["forgotten_case_ids"]) / len(applied))
        for key in ("efficacy", "paraphrase", "neighborhood", "unedited_efficacy"):
            assert 0.0 <= c[key] <= 1.0
    # drift only grows when every edit adds to the same layers (here it does)
    first, last = ckpts[0]["drift"], ckpts[-1]["drift"]
    assert any(last[p] > first[p] for p in edited)

    # the model is left at the last edit: the log's numbers are what the plain
    # (unbatched) CounterFact scoring says about it now
    window = [r for r in RECORDS if r["case_id"] in (5, 6)]
    now = [counterfact_scores(model, tok, _request(r)) for r in window]
    for key in ("efficacy", "paraphrase", "neighborhood"):
        assert ckpts[-1][key] == pytest.approx(statistics.mean(s[key] for s in now))
    holding = [counterfact_scores(model, tok, _request(r))["efficacy"] for r in RECORDS]
    assert ckpts[-1]["retention"] == pytest.approx(statistics.mean(holding))
    assert sorted(ckpts[-1]["forgotten_case_ids"]) == [
        r["case_id"] for r, h in zip(RECORDS, holding, strict=True) if h == 0.0
    ]
    # the unedited model prefers every true object; the tiny edits take
    assert log["unedited"]["efficacy"] == 0.0
    assert all(c["unedited_efficacy"] == 0.0 and c["efficacy"] > 0.0 for c in ckpts)

    files = main_plot_and_table(out, capsys)
    for key, _ in PLOTS:
        assert (out / f"{key}.png") in files
    assert out / "drift.png" in files
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def main_plot_and_table(out: Path, capsys) -> list[Path]:
    main(["--plot-only", "--table", "--out", str(out)])
    printed = capsys.readouterr().out
    files = [
        Path(line.removeprefix("wrote "))
        for line in printed.splitlines()
        if line.startswith("wrote ")
    ]
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "batch 2" in line]
    # the summary table and the progress table: one row each per run
    assert len(rows) == 2 * len(load_logs(out)) == 2
    assert "| 6/6 |" in rows[0] and rows[1].endswith("| – / – / – / – |")
    return files


def test_max_minutes_cuts_and_resume_finishes_like_an_uncut_run(tmp_path: Path) -> None:
    _, _, whole = _run("memit", tmp_path / "whole", tmp_path)
    out = tmp_path / "cut"
    _, _, cut = _run("memit", out, tmp_path, max_minutes=0.0)
    assert cut["status"] == "cut" and "--max-minutes" in cut["cut_reason"]
    assert [c["edits"] for c in cut["checkpoints"]] == [2]
    assert len(cut["batches"]) == 1
    assert len(list((out / "state").rglob("*.safetensors"))) == 1
    with pytest.raises(ResumeError, match="every"):
        run_sequential(
            tiny_model("llama"), word_tokenizer(), RECORDS, "memit", 2, out, every=4,
            stats_cache=StatsCache(tmp_path / "stats", "tiny-llama"),
            overrides=_overrides("memit"), resume=True,
        )  # fmt: skip
    # a fresh model (as a new process has): the state comes from the snapshot
    model, _, done = _run("memit", out, tmp_path, resume=True)
    assert done["status"] == "complete" and done["resumed"][0]["after"] == "cut"
    assert done["resumed"][0]["setup"]["warmup_s"] > 0 and done["setup"] == cut["setup"]
    assert [c["edits"] for c in done["checkpoints"]] == [2, 4, 6]
    for a, b in zip(whole["checkpoints"], done["checkpoints"], strict=True):
        assert a["drift"] == pytest.approx(b["drift"], rel=1e-6)
        assert a["forgotten_case_ids"] == b["forgotten_case_ids"]
        for key in ("efficacy", "paraphrase", "neighborhood", "retention"):
            assert a[key] == b[key]
    assert summary(done)["edits"] == 6
    assert len(list((out / "state").rglob("*.safetensors"))) == 1
    assert "memit batch 2" in table([done])


def test_progress_reads_retention_at_the_nearest_checkpoint() -> None:
    def batch(n: int, cpu: float) -> dict[str, Any]:
        return {"case_ids": list(range(n)), "compute_cpu_s": cpu, "compute_s": 2 * cpu}

    def ckpt(edits: int, es: float, retention: float, ns: float, n: int) -> dict[str, Any]:
        return {"edits": edits, "efficacy": es, "retention": retention, "neighborhood": ns,
                "unedited_neighborhood": 0.5, "window_edits": n, "window_applied": n}  # fmt: skip

    log = {
        "method": "memit", "batch_size": 64,
        "batches": [batch(64, 64.0), batch(64, 128.0), batch(64, 96.0), batch(8, 40.0)],
        "checkpoints": [ckpt(64, 1.0, 1.0, 0.5, 64), ckpt(128, 0.75, 0.9, 0.25, 64),
                        ckpt(192, 0.9, 0.8, 0.25, 64), ckpt(200, 1.0, 0.7, 0.0, 8)],
    }  # fmt: skip
    p = progress(log, marks=(100, 200, 250))
    assert p["cpu_s_per_edit_median"] == pytest.approx(1.75)  # of 1, 2, 1.5, 5
    assert p["cpu_s_per_edit_max"] == 5.0 and p["s_per_edit_median"] == pytest.approx(3.5)
    assert p["lowest_window_efficacy"] == (128, 0.75)
    # NS against the unedited 0.5 over the first / the last ≥ 100 edits, by window size
    assert p["ns_change_first"] == pytest.approx(-0.125)  # windows 64, 128: 0, −0.25
    assert p["ns_change_last"] == pytest.approx((-0.25 * 64 * 2 - 0.5 * 8) / 136)
    # 100 is nearer 128 than 64; 200 is a checkpoint; the run stopped before 250
    assert p["retention_at"] == {100: (128, 0.9), 200: (200, 0.7), 250: None}
    row = progress_table([log], marks=(100, 200, 250)).splitlines()[-1]
    assert row == (
        "| memit batch 64 | 1.75 (5.00) | 3.50 | 0.75 (128) | −0.12 → −0.26 "
        "| 0.900 (128) / 0.700 / – |"
    )
