"""Stand-ins for ``workers.jobs.score``/``generate`` with the same signatures, run by a
real rq SimpleWorker in the read-path tests (no model, no torch)."""

from __future__ import annotations

import time
from typing import Any

VERSION = 7


def score(model: str, prompts: list[str], targets: list[str]) -> dict[str, Any]:
    return {
        "logprobs": [-float(len(p) + len(t)) for p, t in zip(prompts, targets, strict=True)],
        "version": VERSION,
    }


def generate(model: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    return {"text": f"{prompt} [{model}:{max_new_tokens}]", "version": VERSION}


def fail(model: str, **kwargs: Any) -> dict[str, Any]:
    raise RuntimeError(f"this worker serves another model, not {model!r}")


def busy(seconds: float) -> None:
    """Work that keeps the worker busy (an edit, a statistics step)."""
    time.sleep(seconds)
