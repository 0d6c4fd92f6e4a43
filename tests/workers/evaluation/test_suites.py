"""The counterfact and retention suites and the suite registry, on tiny random models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from service.suites import SUITE_NAMES
from tests.tiny_models import changed_tensors, state_copy, tiny_model, word_tokenizer
from workers.editing.types import EditRequest
from workers.evaluation import counterfact, retention
from workers.evaluation.scoring import counterfact_scores, target_logprobs
from workers.evaluation.suites import SUITES, load_suite

SHARED_DATA = Path(
    os.environ.get("MEMEDIT_SHARED_DATA") or Path(__file__).resolve().parents[4] / "shared" / "data"
)

FACTS = [
    ("{} was born in", "Mozart", "Vienna", "Rome"),
    ("{} lives in", "Picasso", "Paris", "Madrid"),
    ("{} speaks", "Einstein", "German", "French"),
    ("The mother tongue of {} is", "Tolstoy", "Russian", "English"),
    ("{} plays the", "Ada", "piano", "guitar"),
]


def _record(i: int, prompt: str, subject: str, new: str, true: str, **extra: Any) -> dict:
    return {
        "case_id": 100 + i,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new},
            "target_true": {"str": true},
            "relation_id": None,
        },
        "paraphrase_prompts": [f"{subject} is known in", f"The home of {subject} is"],
        "neighborhood_prompts": [f"Newton {prompt.replace('{}', '').strip()}"],
        **extra,
    }


RECORDS = [_record(i, *f) for i, f in enumerate(FACTS)]


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    return tiny_model("llama", seed=3), word_tokenizer()


def test_counterfact_suite_equals_the_per_edit_scores(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    before = state_copy(model)
    seen: list[float] = []
    out = counterfact.run_suite(
        model, tok, {"records": RECORDS}, progress=lambda f, m: seen.append(f)
    )
    assert changed_tensors(model, before) == []
    assert seen and seen[-1] == 1.0
    rows = out["details"]["records"]
    assert [r["case_id"] for r in rows] == [100, 101, 102, 103, 104]
    expected = []
    for rec in RECORDS:
        rw = rec["requested_rewrite"]
        req = EditRequest(
            prompt=rw["prompt"],
            subject=rw["subject"],
            target_new=rw["target_new"]["str"],
            target_true=rw["target_true"]["str"],
            paraphrase_prompts=tuple(rec["paraphrase_prompts"]),
            neighborhood_prompts=tuple(rec["neighborhood_prompts"]),
        )
        expected.append(counterfact_scores(model, tok, req))
    for row, exp in zip(rows, expected, strict=True):
        for key in ("efficacy", "paraphrase", "neighborhood"):
            assert row[key] == exp[key], (key, row, exp)
        for key in ("efficacy_diff", "paraphrase_diff", "neighborhood_diff"):
            assert row[key] == pytest.approx(exp[key], abs=1e-6)
    metrics = out["metrics"]
    for key in ("efficacy", "paraphrase", "neighborhood"):
        assert metrics[key] == pytest.approx(sum(e[key] for e in expected) / len(expected))
    parts = [metrics["efficacy"], metrics["paraphrase"], metrics["neighborhood"]]
    hmean = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    assert metrics["score"] == pytest.approx(hmean)
    assert metrics["count"] == 5.0
    # the result is plain JSON and the same on a second run (deterministic)
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert counterfact.run_suite(model, tok, {"records": RECORDS}) == out


def test_counterfact_suite_reads_a_jsonl_slice(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    path = tmp_path / "cf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    out = counterfact.run_suite(model, tok, {"data_path": str(path), "offset": 1, "limit": 3})
    assert [r["case_id"] for r in out["details"]["records"]] == [101, 102, 103]
    inline = counterfact.run_suite(model, tok, {"records": RECORDS[1:4]})
    assert out == inline
    tail = counterfact.run_suite(model, tok, {"data_path": str(path), "offset": 4})
    assert [r["case_id"] for r in tail["details"]["records"]] == [104]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "either records or data_path"),
        ({"records": RECORDS, "data_path": "/x"}, "either records or data_path"),
        ({"data_path": "/nonexistent/cf.jsonl"}, "does not exist"),
        ({"records": RECORDS, "offset": 9}, "no records selected"),
        ({"records": [{"case_id": 1}]}, r"record 0 \(case_id 1\) lacks"),
        (
            {"records": [_record(0, "no placeholder", "Ada", "Rome", "Paris")]},
            "exactly one",
        ),
    ],
)
def test_counterfact_suite_rejects_bad_params(
    llama: tuple[Any, Any], params: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        counterfact.run_suite(*llama, params)


def test_counterfact_suite_on_the_shared_dev_file(llama: tuple[Any, Any]) -> None:
    path = SHARED_DATA / "counterfact_dev.jsonl"
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} is absent (set MEMEDIT_SHARED_DATA)")
    out = counterfact.run_suite(*llama, {"data_path": str(path), "limit": 4})
    assert out["metrics"]["count"] == 4.0
    assert len(out["details"]["records"]) == 4
    assert all(0.0 <= out["metrics"][k] <= 1.0 for k in ("efficacy", "paraphrase", "neighborhood"))


def _edits() -> list[dict[str, Any]]:
    return [
        {
            "edit_id": 10 + i,
            "prompt": prompt,
            "subject": subject,
            "target_new": new,
            "target_true": true,
        }
        for i, (prompt, subject, new, true) in enumerate(FACTS)
    ]


def test_retention_counts_the_edits_whose_new_target_still_wins(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    edits = _edits()
    lp_new = target_logprobs(model, tok, [e["prompt"].format(e["subject"]) for e in edits],
                             [e["target_new"] for e in edits])  # fmt: skip
    lp_true = target_logprobs(model, tok, [e["prompt"].format(e["subject"]) for e in edits],
                              [e["target_true"] for e in edits])  # fmt: skip
    held = [n > t for n, t in zip(lp_new, lp_true, strict=True)]
    # on a random model some "edits" win and some do not: the suite must tell them apart
    assert 0 < sum(held) < len(held), (lp_new, lp_true)
    edits.append({**edits[0], "edit_id": 99, "target_true": None})  # nothing to compare with
    before = state_copy(model)
    out = retention.run_suite(model, tok, {"edits": edits})
    assert changed_tensors(model, before) == []
    forgotten = [e["edit_id"] for e, h in zip(edits, held, strict=False) if not h]
    assert out["details"]["forgotten"] == forgotten
    assert out["details"]["unscored"] == [99]
    assert out["metrics"] == {"retention": sum(held) / len(held), "count": float(len(held))}
    for row, n, t in zip(out["details"]["edits"], lp_new, lp_true, strict=True):
        assert math.isclose(row["lp_new"], n, abs_tol=1e-6)
        assert math.isclose(row["lp_true"], t, abs_tol=1e-6)


def test_retention_limit_takes_an_evenly_spaced_sample(llama: tuple[Any, Any]) -> None:
    assert retention.spaced_sample(list(range(10)), 4) == [0, 3, 6, 9]
    assert retention.spaced_sample(list(range(3)), 5) == [0, 1, 2]
    assert retention.spaced_sample(list(range(5)), 1) == [4]
    out = retention.run_suite(*llama, {"edits": _edits(), "limit": 3})
    assert [e["edit_id"] for e in out["details"]["edits"]] == [10, 12, 14]
    empty = retention.run_suite(*llama, {"edits": []})
    assert empty["metrics"] == {"retention": 1.0, "count": 0.0}
    with pytest.raises(ValueError, match="needs edits"):
        retention.run_suite(*llama, {})


def test_registry_names_the_five_suites_the_service_knows() -> None:
    assert set(SUITES) == set(SUITE_NAMES)
    for name, path in SUITES.items():
        module, _, attr = path.partition(":")
        assert module == f"workers.evaluation.{name}" and attr == "run_suite"
    assert load_suite("counterfact") is counterfact.run_suite
    assert load_suite("retention") is retention.run_suite
    with pytest.raises(ValueError, match="unknown suite 'bleu'"):
        load_suite("bleu")


def test_the_job_resolves_paths_and_defaults_the_downstream_folder(tmp_path: Path) -> None:
    from types import SimpleNamespace  # noqa: PLC0415

    from workers.jobs.evaluation import prepare_params  # noqa: PLC0415

    state: Any = SimpleNamespace(settings=SimpleNamespace(data_root=tmp_path))
    root = tmp_path.resolve()
    assert prepare_params(state, "downstream", {}, []) == {"data_dir": str(root / "downstream")}
    assert prepare_params(state, "downstream", {"data_dir": "gcf"}, []) == {
        "data_dir": str(root / "gcf")
    }
    got = prepare_params(state, "counterfact", {"data_path": "a/b.jsonl", "limit": 2}, [])
    assert got == {"data_path": str(root / "a" / "b.jsonl"), "limit": 2}
    edits = [{"edit_id": 1}]
    assert prepare_params(state, "retention", {"limit": 3}, edits) == {"limit": 3, "edits": edits}
    with pytest.raises(ValueError, match="outside the worker's data root"):
        prepare_params(state, "zsre", {"data_path": "/etc/hosts"}, [])
