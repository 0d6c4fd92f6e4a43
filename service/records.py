"""Data-set records as edit requests (the body of ``POST …/edits``), torch-free, for the
CLI (``memedit edit --file``) and the benchmarks that go through the API.

- a **CounterFact** record (``requested_rewrite`` with ``prompt``, ``subject``,
  ``target_new.str``, ``target_true.str``; ``paraphrase_prompts``,
  ``neighborhood_prompts``);
- a **zsRE** record (``subject``, ``src``, ``alt``, ``answers``, ``rephrase``, ``loc``):
  the question with the subject as the template's ``{}``, the new answer ``alt``;
- a record that already is a request (``prompt``, ``subject``, ``target_new``…).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REQUEST_FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood_prompts",
)


def request_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The edit request of one record (module doc); ``ValueError`` for another shape."""
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        return {
            "prompt": rw["prompt"],
            "subject": rw["subject"],
            "target_new": rw["target_new"]["str"],
            "target_true": rw["target_true"]["str"],
            "paraphrase_prompts": list(record.get("paraphrase_prompts") or []),
            "neighborhood_prompts": list(record.get("neighborhood_prompts") or []),
        }
    if "src" in record and "alt" in record:
        subject, question = record["subject"], record["src"]
        if subject not in question:
            raise ValueError(f"zsRE record: subject {subject!r} is not in {question!r}")
        template = question.replace("{", "{{").replace("}", "}}")
        template = template.replace(subject.replace("{", "{{").replace("}", "}}"), "{}", 1)
        answers = record.get("answers") or []
        return {
            "prompt": template,
            "subject": subject,
            "target_new": record["alt"],
            "target_true": answers[0] if answers else None,
            "paraphrase_prompts": [record["rephrase"]] if record.get("rephrase") else [],
        }
    if "prompt" in record and "subject" in record and "target_new" in record:
        return {k: record[k] for k in REQUEST_FIELDS if record.get(k) is not None}
    raise ValueError(
        "a record must be CounterFact (requested_rewrite), zsRE (src, alt) or an edit "
        "request (prompt, subject, target_new)"
    )


def read_requests(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The edit requests of a JSONL file (one record per line), at most ``limit``."""
    with path.open(encoding="utf-8") as fh:
        n = 0
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                yield request_of(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path.name} line {lineno}: {exc}") from None
            n += 1
