"""The downstream suite (lm-eval with the in-memory model) on tiny random models.

The task files are made-up examples (tests/downstream_examples.py, written as
<task>.jsonl into a temporary folder) in the format
of ../shared/data/downstream (pool ``pos`` 0–1, tests ``pos`` ≥ 10). The tokenizer is
character-level, so label words are several tokens long and the scoring rule (the
summed log-probability of ``" " + word`` after the prompt) is visible in the numbers.
The prompt formats are checked against hand-written strings and, when
../shared/data is present, against the data README on the real files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from transformers import AutoModelForCausalLM

from tests.downstream_examples import examples_dir
from tests.tiny_models import changed_tensors, char_tokenizer, state_copy, tiny_config, tiny_model
from workers.evaluation.downstream import run_suite, weighted_f1
from workers.evaluation.downstream_tasks import (
    DEFAULT_LIMIT,
    DEFAULT_SHOTS,
    LOCAL_TASKS,
    parse_params,
    read_task_file,
    render_prompt,
)

REPO = Path(__file__).resolve().parents[3]
FIXTURES = examples_dir()
ALL_TASKS = sorted(LOCAL_TASKS)


def long_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``kind`` with room for character-level few-shot prompts."""
    cfg = tiny_config(kind)
    if kind == "gpt2":
        cfg.n_positions = 1024
    else:
        cfg.max_position_embeddings = 1024
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.requires_grad_(False)
    return model.eval()


def _shared_data() -> Path:
    env = os.environ.get("MEMEDIT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _params(**kw) -> dict:
    return {"tasks": ALL_TASKS, "shots": 1, "data_dir": str(FIXTURES), **kw}


# -- prompt formats ---------------------------------------------------------------------

# the first test example of each fixture with one demonstration, written out by hand
# from ../shared/data/README.md, "Few-shot prompt formats"
EXPECTED_ONE_SHOT = {
    "sst2": "Review : a warm , funny film\nSentiment : positive\n"
    "Review :a joy to watch\nSentiment :",
    "mrpc": "Are the sentences paraphrases of each other.\nSentence 1: The cat sat down.\n"
    "Sentence 2: The cat took a seat.\nAnswer: Yes\n"
    "Are the sentences paraphrases of each other.\nSentence 1: He left at noon.\n"
    "Sentence 2: He went away at midday.\nAnswer:",
    "cola": "Is this sentence linguistically acceptable?\nSentence: The dog barked.\nAnswer: Yes\n"
    "Is this sentence linguistically acceptable?\nSentence: She reads books.\nAnswer: ",
    # GLUE meaning: label 0 (entailment) is "True"
    "rte": "Ann lives in Rome.\nquestion: Ann lives in Italy. True or False?\nanswer: True\n"
    "The bridge is 2 km long.\nquestion: The bridge is long. True or False?\nanswer:",
    "nli": "A man plays a guitar. entails the A man makes music. True or False? Answer: True\n"
    "The oven is hot. entails the The oven is on. True or False? Answer:",
    "sentiment_analysis": "For each snippet of text,label the sentiment of the text as positive "
    "or negative.The answer should be exact 'positive' or 'negative'. text: lovely and bright "
    "answer: positive\nFor each snippet of text,label the sentiment of the text as positive or "
    "negative.The answer should be exact 'positive' or 'negative'. text: pure delight answer:",
    "mmlu": "Question: 2 + 2 =\n(A) 3\n(B) 4\n(C) 5\n(D) 6\nAnswer: B\n"
    "Question: 3 x 3 =\n(A) 9\n(B) 6\n(C) 12\n(D) 3\nAnswer:",
    "dialogue": "Q: Given the following: m : is it late ? f : it is ten .\nWhich choice is correct?\n"
    "(A)f : it is noon .\n(B)f : it is ten .\n(C)f : no .\n(D)f : yes .\nAnswer: B\n\n"
    "Q: Given the following: m : hi . f : hello .\nWhich choice is correct?\n"
    "(A)m : how are you ?\n(B)m : it rained .\n(C)m : a cat .\n(D)m : 42 .\nAnswer:",
}


@pytest.mark.parametrize("name", ALL_TASKS)
def test_prompts_follow_the_unified_formats(name: str) -> None:
    task = LOCAL_TASKS[name]
    pool, tests = read_task_file(task, FIXTURES / f"{name}.jsonl")
    assert len(pool) == 2 and all(d["pos"] >= 10 for d in tests)
    assert render_prompt(task, pool, tests[0], 1) == (EXPECTED_ONE_SHOT[name], 1)
    query, kept = render_prompt(task, pool, tests[0], 0)
    assert kept == 0 and EXPECTED_ONE_SHOT[name].endswith(query)
    assert render_prompt(task, pool, tests[0], 2)[0].endswith(query)


def test_demonstrations_are_cut_from_the_end_by_the_token_budget() -> None:
    tok, task = char_tokenizer(), LOCAL_TASKS["sst2"]
    pool, tests = read_task_file(task, FIXTURES / "sst2.jsonl")
    query = task.query(tests[0])
    demos = [task.demo(d, task.choices[task.gold(d)]) for d in pool]
    room = len(query) + len(" negative")  # one character per token
    assert render_prompt(task, pool, tests[0], 2, tok, room + len(demos[0]) + len(demos[1])) == (
        demos[0] + demos[1] + query,
        2,
    )
    # one token short of the second demonstration: only the first is kept
    cut = render_prompt(task, pool, tests[0], 2, tok, room + len(demos[0]) + len(demos[1]) - 1)
    assert cut == (demos[0] + query, 1)
    assert render_prompt(task, pool, tests[0], 2, tok, room + len(demos[0]) - 1) == (query, 0)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_real_task_files_render_as_the_data_readme_says(name: str) -> None:
    folder = _shared_data() / "downstream"
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{folder} not found (required when CI=true)")
        pytest.skip(f"downstream data not found at {folder} (set MEMEDIT_SHARED_DATA)")
    task = LOCAL_TASKS[name]
    pool, tests = read_task_file(task, folder / f"{name}.jsonl")
    assert [d["pos"] for d in pool] == list(range(10))
    assert tests[0]["pos"] == 10 and all(d["role"] == "test" for d in tests[:50])
    d, s = tests[0], pool[0]
    letters = "ABCD"
    # the README's demonstration and query templates, written out again here
    want = {
        "sst2": lambda: (
            f"Review : {s['sentence']}\nSentiment : {'positive' if s['label'] == 1 else 'negative'}\n"
            f"Review :{d['sentence']}\nSentiment :"
        ),
        "mrpc": lambda: "".join(
            f"Are the sentences paraphrases of each other.\nSentence 1: {x['sentence1']}\n"
            f"Sentence 2: {x['sentence2']}\nAnswer:{end}"
            for x, end in ((s, " Yes\n" if s["label"] == 1 else " No\n"), (d, ""))
        ),
        "cola": lambda: "".join(
            f"Is this sentence linguistically acceptable?\nSentence: {x['sentence']}\nAnswer: {end}"
            for x, end in ((s, "Yes\n" if s["label"] == 1 else "No\n"), (d, ""))
        ),
        "rte": lambda: (
            f"{s['sentence1']}\nquestion: {s['sentence2']} True or False?\n"
            f"answer: {'True' if s['label_text'] == 'entailment' else 'False'}\n"
            f"{d['sentence1']}\nquestion: {d['sentence2']} True or False?\nanswer:"
        ),
        "nli": lambda: (
            f"{s['sentence1']} entails the {s['sentence2']} True or False? Answer: "
            f"{'True' if s['label'] == 'entailment' else 'False'}\n"
            f"{d['sentence1']} entails the {d['sentence2']} True or False? Answer:"
        ),
        "sentiment_analysis": lambda: "".join(
            "For each snippet of text,label the sentiment of the text as positive or negative."
            f"The answer should be exact 'positive' or 'negative'. text: {x['sentence']} answer:{end}"
            for x, end in ((s, " positive\n" if s["label"] == "1" else " negative\n"), (d, ""))
        ),
        "mmlu": lambda: "".join(
            f"Question: {x['question']}\n"
            + "".join(f"({letters[i]}) {c}\n" for i, c in enumerate(x["choices"]))
            + f"Answer:{end}"
            for x, end in ((s, f" {letters[s['answer']]}\n"), (d, ""))
        ),
        "dialogue": lambda: "".join(
            f"Q: Given the following: {x['article']}\nWhich choice is correct?\n"
            + "".join(f"({letters[i]}){o}\n" for i, o in enumerate(x["options"]))
            + f"Answer:{end}"
            for x, end in ((s, f" {s['answers']}\n\n"), (d, ""))
        ),
    }[name]()
    assert render_prompt(task, pool, d, 1) == (want, 1)


# -- lm-eval's result against a direct computation ---------------------------------------


def direct_choice_logprobs(model, tok, prompt: str, words) -> list[float]:
    """Unbatched, unpadded: log P(tokens of prompt + " " + w beyond the prompt's own),
    the prompt's trailing whitespace counted with the word."""
    n_ctx = len(tok(prompt.rstrip())["input_ids"])
    out = []
    for w in words:
        ids = tok(prompt + " " + w)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(float(logp[j - 1, ids[j]]) for j in range(n_ctx, len(ids))))
    return out


@pytest.mark.parametrize(("kind", "bos"), [("gpt2", False), ("llama", True)])
def test_lm_eval_result_equals_a_direct_computation(kind: str, bos: bool) -> None:
    model, tok = long_model(kind), char_tokenizer(bos=bos)
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == bos
    before = state_copy(model)
    got = run_suite(model, tok, _params())
    assert changed_tensors(model, before) == []
    macro = []
    for name in ALL_TASKS:
        task = LOCAL_TASKS[name]
        pool, tests = read_task_file(task, FIXTURES / f"{name}.jsonl")
        golds, preds, lls = [], [], []
        for d in tests:
            prompt = (
                EXPECTED_ONE_SHOT[name] if d is tests[0] else render_prompt(task, pool, d, 1)[0]
            )
            row = direct_choice_logprobs(model, tok, prompt, task.choices)
            lls.append(row)
            golds.append(task.gold(d))
            preds.append(max(range(len(row)), key=lambda i: (row[i], -i)))
        detail = got["details"][name]
        assert detail["examples"] == len(tests) and detail["shots"] == 1
        assert [e["pos"] for e in detail["predictions"]] == [d["pos"] for d in tests]
        assert [e["gold"] for e in detail["predictions"]] == golds
        assert [e["pred"] for e in detail["predictions"]] == preds
        for e, row in zip(detail["predictions"], lls, strict=True):
            assert e["lls"] == pytest.approx(row, abs=2e-4)
            assert max(row) - min(row) > 1e-3  # the choices are told apart
        f1 = f1_score(golds, preds, average="weighted")
        assert got["metrics"][f"{name}_f1"] == pytest.approx(f1, abs=1e-12)
        assert detail["acc"] == pytest.approx(
            sum(g == p for g, p in zip(golds, preds, strict=True)) / len(golds)
        )
        if task.headline == "acc":
            assert got["metrics"][f"{name}_acc"] == detail["acc"]
        macro.append(f1)
        brier = 0.0
        for row, gold in zip(lls, golds, strict=True):
            probs = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
            brier += sum((q - (i == gold)) ** 2 for i, q in enumerate(probs)) / len(golds)
        assert detail["brier"] == pytest.approx(brier, abs=1e-4)
        assert detail["label_tokens"] == {w: len(" " + w) for w in task.choices}
    assert got["metrics"]["macro_f1"] == pytest.approx(sum(macro) / len(macro), abs=1e-12)
    json.dumps(got)  # stored in the ledger


def test_the_scores_change_with_the_weights() -> None:
    tok = char_tokenizer()
    a = run_suite(long_model("llama", seed=0), tok, _params(tasks=["sst2", "mmlu"]))
    b = run_suite(long_model("llama", seed=1), tok, _params(tasks=["sst2", "mmlu"]))
    lls = [e["lls"] for e in a["details"]["sst2"]["predictions"]]
    assert lls != [e["lls"] for e in b["details"]["sst2"]["predictions"]]


def test_deterministic_default_tasks_limit_progress_and_train_mode_restored() -> None:
    model, tok = long_model("gpt2"), char_tokenizer()  # GPT-2 has dropout: eval mode matters
    model.train()
    seen: list[tuple[float, str]] = []
    first = run_suite(
        model, tok, _params(tasks=None, limit=2), progress=lambda f, m: seen.append((f, m))
    )
    assert model.training and all(m.training for m in model.modules())
    assert sorted(first["details"]) == ["cola", "mmlu", "mrpc", "nli", "rte", "sst2"]
    assert all(d["examples"] == 2 for d in first["details"].values())
    again = run_suite(model, tok, _params(tasks=None, limit=2))
    assert again["metrics"] == first["metrics"]
    done = [f for f, m in seen if m.endswith(" of 6)")]
    assert done == pytest.approx([i / 6 for i in range(1, 7)])  # one "done" per task
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and len(seen) > len(done)
    within = [m for _, m in seen if "scores" in m]  # per slice of batches, with the time left
    assert within and all(" left" in m for m in within), within
    assert within[0].startswith("sst2 (1 of 6): ")
    defaults = parse_params({"data_dir": str(FIXTURES)})
    assert defaults.shots == DEFAULT_SHOTS and defaults.limit == DEFAULT_LIMIT
    assert parse_params({"data_dir": str(FIXTURES), "limit": "all"}).limit is None


def test_a_short_context_drops_the_demonstrations() -> None:
    # the tiny LLaMA's 64 positions hold a query and its label, not a demonstration too
    model, tok = tiny_model("llama"), char_tokenizer()
    got = run_suite(model, tok, _params(tasks=["sst2"], shots=2))
    assert got["details"]["sst2"]["demos_min"] == 0
    assert got["details"]["sst2"]["longest_input_tokens"] <= 64


def test_tokenizer_without_pad_token_is_not_changed() -> None:
    model, tok = long_model("llama"), char_tokenizer()
    tok.pad_token = None
    run_suite(model, tok, _params(tasks=["cola"]))
    assert tok.pad_token is None


def test_weighted_f1_matches_scikit_learn() -> None:
    g = torch.Generator().manual_seed(0)
    for classes in (2, 4):
        golds = torch.randint(0, classes, (50,), generator=g).tolist()
        preds = torch.randint(0, classes, (50,), generator=g).tolist()
        preds[:3] = [0, 0, 0]
        want = f1_score(golds, preds, average="weighted")
        assert weighted_f1(list(zip(golds, preds, strict=True))) == pytest.approx(want, abs=1e-12)
    assert weighted_f1([(1, 1), (1, 1)]) == 1.0


# -- bad params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": "sst2"}, "tasks"),
        ({"tasks": ["sst2", "sst2"]}, "repeat"),
        ({"shots": 11}, "shots"),
        ({"shots": -1}, "shots"),
        ({"shots": True}, "shots"),
        ({"limit": 0}, "limit"),
        ({"limit": "some"}, "limit"),
        ({"color": "red"}, "unknown"),
        ({"data_dir": None}, "data_dir is needed"),
        ({"data_dir": "/nonexistent/folder"}, "not a folder"),
    ],
)
def test_bad_params_raise_value_error(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_params({"data_dir": str(FIXTURES), **params})


def test_bad_data_raises_value_error(tmp_path: Path) -> None:
    model, tok = long_model("llama"), char_tokenizer()
    with pytest.raises(ValueError, match="2 few-shot examples, 3 asked"):
        run_suite(model, tok, _params(tasks=["sst2"], shots=3))
    with pytest.raises(ValueError, match="does not exist"):
        run_suite(model, tok, {"tasks": ["sst2"], "data_dir": str(tmp_path)})
    (tmp_path / "sst2.jsonl").write_text('{"pos": 10, "sentence": "no label"}\n')
    with pytest.raises(ValueError, match="line 1 lacks label"):
        run_suite(model, tok, {"tasks": ["sst2"], "shots": 0, "data_dir": str(tmp_path)})
    (tmp_path / "sst2.jsonl").write_text('{"pos": 1, "sentence": "pool only", "label": 1}\n')
    with pytest.raises(ValueError, match="no test examples"):
        run_suite(model, tok, {"tasks": ["sst2"], "shots": 0, "data_dir": str(tmp_path)})
    (tmp_path / "mmlu.jsonl").write_text(
        '{"pos": 10, "question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}\n'
    )
    with pytest.raises(ValueError, match="label out of range"):
        run_suite(model, tok, {"tasks": ["mmlu"], "shots": 0, "data_dir": str(tmp_path)})
    (tmp_path / "mmlu.jsonl").write_text(
        '{"pos": 10, "question": "q", "choices": ["a", "b", "c"], "answer": 1}\n'
    )
    with pytest.raises(ValueError, match="line 1: cannot render it"):
        run_suite(model, tok, {"tasks": ["mmlu"], "shots": 0, "data_dir": str(tmp_path)})


def test_an_unknown_lm_eval_task_raises_value_error() -> None:
    model, tok = long_model("gpt2"), char_tokenizer()
    before = state_copy(model)
    with pytest.raises(ValueError, match="no_such_task_memedit"):
        run_suite(model, tok, {"tasks": ["no_such_task_memedit"]})
    with pytest.raises(ValueError, match="lm-eval task 'sst2_nope'"):
        run_suite(model, tok, {"tasks": ["lm_eval.sst2_nope"]})
    assert changed_tensors(model, before) == []
