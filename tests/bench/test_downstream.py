"""bench/downstream.py on a tiny random LLaMA with the fixture task files (the real
SmolLM2 run is the lead's, on the full sets)."""

from __future__ import annotations

from bench.downstream import score, table
from tests.downstream_examples import examples_dir
from tests.tiny_models import char_tokenizer, tiny_model

FIXTURES = examples_dir()


def test_score_and_table() -> None:
    model, tok = tiny_model("llama"), char_tokenizer()
    echoed: list[str] = []
    res = score(model, tok, ["sst2", "mmlu"], 1, 3, FIXTURES, echo=echoed.append)
    assert list(res["tasks"]) == ["sst2", "mmlu"]
    # one line per task done, and progress lines within each task (with the time left)
    assert [e.split()[1] for e in echoed if "done" in e] == ["sst2", "mmlu"]
    assert any("scores, about" in e for e in echoed)
    sst2, mmlu = res["tasks"]["sst2"], res["tasks"]["mmlu"]
    assert (sst2["examples"], sst2["metric"], sst2["score"]) == (3, "f1", res["metrics"]["sst2_f1"])
    assert (mmlu["metric"], mmlu["score"]) == ("acc", res["metrics"]["mmlu_acc"])
    assert sum(sst2["predicted"].values()) == 3 and sst2["gold"] == {"negative": 1, "positive": 2}
    # the 64-position model has no room for the demonstration: the table says so
    lines = table(res).splitlines()
    assert lines[2].startswith("| sst2 | 3 | 1 (≥0 fit) | weighted F1 |")
    assert lines[3].startswith("| mmlu | 3 | 1 (≥0 fit) | accuracy |")
    assert (
        lines[-1].startswith("| **macro** |") and f"{res['metrics']['macro_f1']:.3f}" in lines[-1]
    )
