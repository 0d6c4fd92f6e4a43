"""The zsre suite: token accuracy (rebuilding-rome's definition) on tiny random models
with the character-level tokenizer, so every answer is several tokens long.

The records are written here (made-up questions in MEND's zsRE format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import changed_tensors, char_tokenizer, state_copy, tiny_model
from workers.evaluation.zsre import run_suite

RECORDS = [
    {"source_index": 3, "subject": "Ada", "src": "Where did Ada work?", "answers": ["Paris"],
     "rephrase": "Ada worked where?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
     "alt": "Rome", "pred": "Paris", "cond": "x"},
    {"source_index": 7, "subject": "Tom", "src": "What does Tom play?", "answers": ["chess", "go"],
     "rephrase": "Which game is Tom's?", "loc": "nq question: capital of peru", "loc_ans": "Lima"},
    {"source_index": 9, "subject": "Bo", "src": "Bo is a?", "answers": ["cat"],
     "rephrase": "What is Bo?", "loc": "nq question: how many legs has a spider", "loc_ans": "8"},
]  # fmt: skip


def direct_token_accuracy(model, tok, prompt: str, answer: str) -> list[bool]:
    """One unpadded forward pass per answer token, as the data README defines it."""
    target = tok(" " + answer, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(len(target)):
        ids = tok(prompt + tok.decode(target[:i]))["input_ids"]
        want = tok(tok.decode(target[i]), add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt == want)
    return out


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize(("kind", "bos"), [("gpt2", False), ("llama", True)])
def test_token_accuracy_equals_a_direct_computation(kind: str, bos: bool) -> None:
    model, tok = tiny_model(kind), char_tokenizer(bos=bos)
    before = state_copy(model)
    seen = []
    got = run_suite(model, tok, {"records": RECORDS}, progress=lambda f, m: seen.append(f))
    assert changed_tensors(model, before) == []
    assert seen and seen[-1] == 1.0
    want = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for rec, row in zip(RECORDS, got["details"]["records"], strict=True):
        flags = {
            "efficacy": direct_token_accuracy(model, tok, rec["src"], rec["answers"][0]),
            "paraphrase": direct_token_accuracy(model, tok, rec["rephrase"], rec["answers"][0]),
            "neighborhood": direct_token_accuracy(model, tok, rec["loc"] + "?", rec["loc_ans"]),
        }
        assert row["source_index"] == rec["source_index"]
        for group, f in flags.items():
            assert row[f"{group}_tokens"] == f
            assert row[group] == pytest.approx(_mean(f))
            want[group].append(_mean(f))
    for group, values in want.items():
        assert got["metrics"][group] == pytest.approx(_mean(values))
    assert got["metrics"]["count"] == 3.0
    json.dumps(got)


def test_a_model_that_always_says_one_letter_scores_its_share_of_the_answer() -> None:
    # the answer " aab" is 4 tokens: " ", "a", "a", "b"; a model forced to say "a" gets
    # exactly the two middle ones right, whatever the prompt (positions are checked)
    model, tok = tiny_model("llama"), char_tokenizer()

    def say_a(module, args, output):
        output = output.clone()
        output[..., ord("a")] += 1e4
        return output

    handle = model.lm_head.register_forward_hook(say_a)
    try:
        rec = {
            "src": "Say it:",
            "answers": ["aab"],
            "rephrase": "Again, say it",
            "loc": "q",
            "loc_ans": "ab",
        }
        long = {"src": "A much longer question that pads the others?", "answers": ["aaaa"]}
        got = run_suite(model, tok, {"records": [rec, long]})
    finally:
        handle.remove()
    rows = got["details"]["records"]
    assert rows[0]["efficacy_tokens"] == [False, True, True, False]
    assert rows[0]["neighborhood_tokens"] == [False, True, False]
    assert rows[1]["efficacy"] == pytest.approx(4 / 5)
    assert got["metrics"]["efficacy"] == pytest.approx((0.5 + 0.8) / 2)
    assert got["metrics"]["paraphrase"] == pytest.approx(0.5)  # only the first record has one
    assert got["metrics"]["neighborhood"] == pytest.approx(1 / 3)


def test_data_path_offset_and_limit(tmp_path: Path) -> None:
    model, tok = tiny_model("gpt2"), char_tokenizer()
    path = tmp_path / "zsre.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    got = run_suite(model, tok, {"data_path": str(path), "offset": 1, "limit": 1})
    inline = run_suite(model, tok, {"records": RECORDS[1:2]})
    assert got["metrics"] == inline["metrics"] and got["metrics"]["count"] == 1.0
    assert got["details"]["records"][0]["source_index"] == 7


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "either records or data_path"),
        ({"records": RECORDS, "data_path": "/x.jsonl"}, "either records or data_path"),
        ({"records": RECORDS, "offset": -1}, "offset"),
        ({"records": RECORDS, "limit": 0}, "limit"),
        ({"records": RECORDS, "offset": 3}, "no records selected"),
        ({"records": "abc"}, "list"),
        ({"records": [{"answers": ["x"]}]}, "lacks src"),
        ({"records": [{"src": "q?", "answers": []}]}, "lacks answers"),
        ({"records": [{"src": "q?", "answers": [""]}]}, r"answers\[0\]"),
        ({"records": [{"src": "q?", "answers": ["a"], "loc": "nq"}]}, "loc and loc_ans"),
        ({"records": RECORDS, "batch": 3}, "unknown"),
        ({"data_path": "/nonexistent/zsre.jsonl"}, "does not exist"),
    ],
)
def test_bad_params_raise_value_error(params: dict, match: str) -> None:
    model, tok = tiny_model("gpt2"), char_tokenizer()
    with pytest.raises(ValueError, match=match):
        run_suite(model, tok, params)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "zsre.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run_suite(tiny_model("gpt2"), char_tokenizer(), {"data_path": str(path)})
