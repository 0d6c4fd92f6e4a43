"""The ``zsre`` suite: token accuracy of a model on zsRE question–answer records
(Levy et al. 2017, in MEND's format), as ROME/MEMIT/EMMET report it (Meng et al.
2022, "Locating and Editing Factual Associations in GPT", §3 zsRE; the definition is
rebuilding-rome's ``experiments/py/eval_utils_zsre.py``, ../shared/data/README.md
"zsRE token accuracy").

For a prompt p and an answer a, let t_1…t_k be the tokens of ``" " + a`` (without
special tokens). For each i = 0…k−1 the input is the text ``p + decode(t_1…t_i)``,
re-tokenized (with the tokenizer's special tokens); it is correct when the argmax of
the next-token logits at its last position equals the first token of
``decode(t_{i+1})``. Teacher forcing on the gold answer, so a record contributes k
booleans per prompt, averaged per prompt and then over records:

- efficacy: p = ``src`` (the question; the edit's prompt is ``src`` with the subject
  replaced by ``{}``, which formats back to ``src``), a = ``answers[0]``;
- paraphrase: p = ``rephrase``, a = ``answers[0]``;
- neighborhood: p = ``loc + "?"`` (keeping its ``"nq question: "`` prefix, as
  rebuilding-rome), a = ``loc_ans``: an unrelated question whose accuracy should not
  move when the model is edited.

Inputs of all records are scored in right-padded batches; the last position of a
row is its attention mask's sum − 1.

Params: ``records`` (a list of records) or ``data_path`` (an absolute JSONL path; the
worker resolves it), then ``offset`` and ``limit`` select records in order;
``rephrase`` and ``loc``/``loc_ans`` are optional per record (their metric averages
over the records that have them and is absent when none does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.evaluation.records import select_records

BATCH_SIZE = 32
GROUPS = ("efficacy", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class Probe:
    """One prompt of one record, its gold answer and the record it belongs to."""

    record: int
    group: str
    prompt: str
    answer: str


def read_records(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records ``params`` select (:func:`workers.evaluation.records.select_records`)."""
    return select_records(params, "zsre")


def probes_of(record: Any, index: int) -> list[Probe]:
    """The prompts of one zsRE record; ``ValueError`` naming the record if its question
    or answer is missing."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index} is not an object")

    def text(key: str) -> str | None:
        value = record.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"record {index}: {key} must be a non-empty string")
        return value

    src = text("src")
    answers = record.get("answers")
    if src is None:
        raise ValueError(f"record {index} lacks src (the question)")
    if not isinstance(answers, Sequence) or isinstance(answers, str) or not answers:
        raise ValueError(f"record {index} lacks answers (a non-empty list)")
    answer = answers[0]
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"record {index}: answers[0] must be a non-empty string")
    out = [Probe(index, "efficacy", src, answer)]
    rephrase = text("rephrase")
    if rephrase is not None:
        out.append(Probe(index, "paraphrase", rephrase, answer))
    loc, loc_ans = text("loc"), text("loc_ans")
    if (loc is None) != (loc_ans is None):
        raise ValueError(f"record {index}: loc and loc_ans go together")
    if loc is not None and loc_ans is not None:
        out.append(Probe(index, "neighborhood", loc + "?", loc_ans))
    return out


def _pad_id(tok: Any) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def token_inputs(tok: Any, probe: Probe) -> list[tuple[list[int], int]]:
    """(input ids, expected next token) for each of the answer's k tokens."""
    target = list(tok(" " + probe.answer, add_special_tokens=False)["input_ids"])
    if not target:
        raise ValueError(f"record {probe.record}: the answer tokenizes to nothing")
    out = []
    for i in range(len(target)):
        ids = list(tok(probe.prompt + tok.decode(target[:i]))["input_ids"])
        want = list(tok(tok.decode(target[i]), add_special_tokens=False)["input_ids"])
        out.append((ids, want[0] if want else target[i]))
    return out


def token_correct(
    model: torch.nn.Module, tok: Any, inputs: Sequence[tuple[list[int], int]], batch_size: int
) -> list[bool]:
    """Whether the argmax next token after each input is the expected one (inputs
    right-padded in batches, sorted by length)."""
    device = next(model.parameters()).device
    pad = _pad_id(tok)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]))
    out: list[bool] = [False] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(inputs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            seq = inputs[i][0]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = (mask.sum(1) - 1).to(logits.device)
        picked = logits[torch.arange(len(chunk), device=logits.device), last].argmax(-1)
        for r, i in enumerate(chunk):
            out[i] = int(picked[r]) == inputs[i][1]
    return out


def run_suite(
    model: torch.nn.Module,
    tok: Any,
    params: Mapping[str, Any],
    *,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """zsRE token accuracy (efficacy, paraphrase, neighborhood) over the selected
    records, plus ``count``; ``details.records`` holds each record's per-prompt
    accuracy and token booleans."""
    records = read_records(params)
    if not records:
        raise ValueError("no records selected (check offset and limit against the data)")
    probes = [p for i, r in enumerate(records) for p in probes_of(r, i)]
    inputs: list[tuple[list[int], int]] = []
    spans: list[tuple[int, int]] = []
    for probe in probes:
        these = token_inputs(tok, probe)
        spans.append((len(inputs), len(inputs) + len(these)))
        inputs += these
    modes = {m: m.training for m in model.modules()}
    correct: list[bool] = []
    try:
        model.eval()
        with torch.inference_mode():
            step = BATCH_SIZE * 8  # progress between groups of batches
            for start in range(0, len(inputs), step):
                correct += token_correct(model, tok, inputs[start : start + step], BATCH_SIZE)
                if progress is not None:
                    done = min(start + step, len(inputs))
                    progress(done / len(inputs), f"scored {done} of {len(inputs)} answer tokens")
    finally:
        for module, mode in modes.items():
            module.training = mode
    rows: list[dict[str, Any]] = [
        {"index": i, **({"source_index": r["source_index"]} if "source_index" in r else {})}
        for i, r in enumerate(records)
    ]
    for probe, (a, b) in zip(probes, spans, strict=True):
        flags = correct[a:b]
        rows[probe.record][probe.group] = sum(flags) / len(flags)
        rows[probe.record][f"{probe.group}_tokens"] = flags
    metrics: dict[str, float] = {"count": float(len(records))}
    for group in GROUPS:
        values = [row[group] for row in rows if group in row]
        if values:
            metrics[group] = sum(values) / len(values)
    return {"metrics": metrics, "details": {"records": rows}}
