"""The local tasks of the ``downstream`` suite (:mod:`workers.evaluation.downstream`):
their fields, label words and prompt formats (unified-model-editing's ``glue_eval``,
../shared/data/README.md, "Few-shot prompt formats"), the suite's params, and the
reading and rendering of a task file (docs/evaluation.md has the formats)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_TASKS: tuple[str, ...] = ("sst2", "mrpc", "rte", "cola", "nli", "mmlu")
# unified-model-editing keeps the first 10 examples of each set as the few-shot pool
POOL_SIZE = 10
# unified-model-editing's default is 0 shots; 3 is used here: see docs/evaluation.md
DEFAULT_SHOTS = 3
# test examples per task when the request names no limit: 8 tasks x 10 examples x 3
# shots take about three minutes on one CPU core for SmolLM2 (docs/evaluation.md);
# "limit": "all" scores every test example (hours on a CPU)
DEFAULT_LIMIT = 10
LM_EVAL_PREFIX = "lm_eval."

_SENTIMENT_INSTRUCTION = (
    "For each snippet of text,label the sentiment of the text as positive or negative."
    "The answer should be exact 'positive' or 'negative'. text:"
)


@dataclass(frozen=True)
class LocalTask:
    """A task read from ``<name>.jsonl``: its label words (index = class), the gold
    class of an example, the query and a demonstration (which ends with the label
    word of ``word``), and the metric its studies report."""

    name: str
    fields: tuple[str, ...]
    choices: tuple[str, ...]
    gold: Callable[[Mapping[str, Any]], int]
    query: Callable[[Mapping[str, Any]], str]
    demo: Callable[[Mapping[str, Any], str], str]
    headline: str  # "f1" or "acc"


def _int_label(doc: Mapping[str, Any]) -> int:
    return int(doc["label"])


def _four(doc: Mapping[str, Any], key: str, sep: str) -> str:
    return "".join(
        f"({letter}){sep}{text}\n" for letter, text in zip("ABCD", doc[key], strict=True)
    )


def _mrpc_body(d: Mapping[str, Any]) -> str:
    return (
        "Are the sentences paraphrases of each other.\n"
        f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\n"
    )


def _cola_body(d: Mapping[str, Any]) -> str:
    return f"Is this sentence linguistically acceptable?\nSentence: {d['sentence']}\n"


def _rte_body(d: Mapping[str, Any]) -> str:
    return f"{d['sentence1']}\nquestion: {d['sentence2']} True or False?\n"


def _nli_q(d: Mapping[str, Any]) -> str:
    return f"{d['sentence1']} entails the {d['sentence2']} True or False? Answer:"


def _sentiment_q(d: Mapping[str, Any]) -> str:
    return f"{_SENTIMENT_INSTRUCTION} {d['sentence']} answer:"


def _mmlu_q(d: Mapping[str, Any]) -> str:
    return f"Question: {d['question']}\n{_four(d, 'choices', ' ')}Answer:"


def _dialogue_q(d: Mapping[str, Any]) -> str:
    return (
        f"Q: Given the following: {d['article']}\nWhich choice is correct?\n"
        f"{_four(d, 'options', '')}Answer:"
    )


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask(
            "sst2", ("sentence", "label"), ("negative", "positive"), _int_label,
            query=lambda d: f"Review :{d['sentence']}\nSentiment :",
            demo=lambda d, w: f"Review : {d['sentence']}\nSentiment : {w}\n",
            headline="f1",
        ),
        LocalTask(
            "mrpc", ("sentence1", "sentence2", "label"), ("No", "Yes"), _int_label,
            query=lambda d: _mrpc_body(d) + "Answer:",
            demo=lambda d, w: _mrpc_body(d) + f"Answer: {w}\n",
            headline="f1",
        ),
        LocalTask(
            "cola", ("sentence", "label"), ("No", "Yes"), _int_label,
            query=lambda d: _cola_body(d) + "Answer: ",
            demo=lambda d, w: _cola_body(d) + f"Answer: {w}\n",
            headline="f1",
        ),
        LocalTask(
            # GLUE: 0 = entailment → "True" (see the module docstring)
            "rte", ("sentence1", "sentence2", "label"), ("True", "False"), _int_label,
            query=lambda d: _rte_body(d) + "answer:",
            demo=lambda d, w: _rte_body(d) + f"answer: {w}\n",
            headline="f1",
        ),
        LocalTask(
            "nli", ("sentence1", "sentence2", "label"), ("True", "False"),
            lambda d: 0 if d["label"] == "entailment" else 1,
            query=_nli_q, demo=lambda d, w: f"{_nli_q(d)} {w}\n", headline="f1",
        ),
        LocalTask(
            "sentiment_analysis", ("sentence", "label"), ("negative", "positive"), _int_label,
            query=_sentiment_q, demo=lambda d, w: f"{_sentiment_q(d)} {w}\n", headline="f1",
        ),
        LocalTask(
            "mmlu", ("question", "choices", "answer"), ("A", "B", "C", "D"),
            lambda d: int(d["answer"]),
            query=_mmlu_q, demo=lambda d, w: f"{_mmlu_q(d)} {w}\n", headline="acc",
        ),
        LocalTask(
            "dialogue", ("article", "options", "answer_index"), ("A", "B", "C", "D"),
            lambda d: int(d["answer_index"]),
            query=_dialogue_q, demo=lambda d, w: f"{_dialogue_q(d)} {w}\n\n", headline="acc",
        ),
    )
}  # fmt: skip


# -- params and data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...]
    shots: int
    limit: int | None
    data_dir: Path | None


def parse_params(params: Mapping[str, Any]) -> Params:
    """Validate the suite's params (``tasks``, ``shots``, ``limit``, ``data_dir``)."""
    unknown = set(params) - {"tasks", "shots", "limit", "data_dir"}
    if unknown:
        raise ValueError(f"unknown downstream params: {', '.join(sorted(unknown))}")
    tasks = params.get("tasks")
    tasks = list(DEFAULT_TASKS) if tasks is None else tasks
    if (
        isinstance(tasks, str)
        or not isinstance(tasks, Sequence)
        or not tasks
        or not all(isinstance(t, str) and t.strip() for t in tasks)
    ):
        raise ValueError("tasks must be a non-empty list of task names")
    tasks = [t.strip() for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise ValueError("tasks must not repeat a name")
    shots = params.get("shots")
    shots = DEFAULT_SHOTS if shots is None else shots
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= POOL_SIZE:
        raise ValueError(f"shots must be an integer from 0 to {POOL_SIZE}")
    limit = params.get("limit")
    if limit is None:
        limit = DEFAULT_LIMIT
    elif limit == "all":
        limit = None
    elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError('limit must be a positive integer, or "all"')
    data_dir = params.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str | Path):
        raise ValueError("data_dir must be a path")
    folder = Path(data_dir) if data_dir is not None else None
    if any(t in LOCAL_TASKS for t in tasks):
        if folder is None:
            raise ValueError("data_dir is needed for the tasks read from <data_dir>/<task>.jsonl")
        if not folder.is_dir():
            raise ValueError(f"data_dir {str(folder)!r} is not a folder")
    return Params(tuple(tasks), shots, limit, folder)


def read_task_file(task: LocalTask, path: Path) -> tuple[list[dict], list[dict]]:
    """(few-shot pool, test examples) of a task file: ``pos`` < 10 and ``pos`` ≥ 10
    (the line's index when it has no ``pos``), each in file order."""
    if not path.is_file():
        raise ValueError(f"task {task.name!r}: {str(path)!r} does not exist")
    pool: list[dict] = []
    tests: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for index, line in enumerate(_lines(fh)):
            lineno, text = line
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name} line {lineno} is not JSON: {exc}") from None
            missing = [f for f in task.fields if f not in doc]
            if missing:
                raise ValueError(f"{path.name} line {lineno} lacks {', '.join(missing)}")
            try:
                gold = task.gold(doc)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path.name} line {lineno}: bad label ({exc})") from None
            if not 0 <= gold < len(task.choices):
                raise ValueError(f"{path.name} line {lineno}: label out of range")
            try:
                task.demo(doc, task.choices[gold])  # four choices where four are shown
                pos = int(doc.get("pos", index))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path.name} line {lineno}: cannot render it ({exc})") from None
            (pool if pos < POOL_SIZE else tests).append(doc)
    return pool, tests


def _lines(fh: io.TextIOBase) -> Iterator[tuple[int, str]]:
    for lineno, text in enumerate(fh, 1):
        if text.strip():
            yield lineno, text


def context_limit(model: torch.nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def render_prompt(
    task: LocalTask, pool: Sequence[Mapping[str, Any]], doc: Mapping[str, Any], shots: int,
    tok: Any = None, max_length: int | None = None,
) -> tuple[str, int]:  # fmt: skip
    """(prompt, demonstrations kept): the first ``shots`` pool examples as
    demonstrations, then ``doc``'s query.

    With a tokenizer and ``max_length``, demonstrations are added in order while
    max_length − tokens(query) − tokens(longest " " + label word) − Σ tokens(demos)
    stays ≥ 0; the first that does not fit ends the list (unified-model-editing's rule,
    with the label continuation in place of its generation length).
    """
    query = task.query(doc)
    demos = [task.demo(d, task.choices[task.gold(d)]) for d in pool[:shots]]
    if demos and tok is not None and max_length is not None:
        budget = max_length - len(tok(query)["input_ids"]) - max(label_tokens(tok, task))
        kept = []
        for demo in demos:
            budget -= len(tok(demo, add_special_tokens=False)["input_ids"])
            if budget < 0:
                break
            kept.append(demo)
        demos = kept
    return "".join(demos) + query, len(demos)


def label_tokens(tok: Any, task: LocalTask) -> list[int]:
    return [len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in task.choices]
