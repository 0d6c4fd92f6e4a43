"""Score and generate: answered at the ledger's head while the API waits
(:func:`service.queue.call_read`)."""

from __future__ import annotations

from typing import Any

from workers.evaluation.scoring import generate as greedy_generate
from workers.evaluation.scoring import target_logprobs
from workers.startup import sync_to_head
from workers.state import WorkerState


def _check_model(state: WorkerState, model: str) -> None:
    if model != state.name:
        raise RuntimeError(f"this worker serves {state.name!r}, not {model!r}")


def score(state: WorkerState, model: str, prompts: list[str], targets: list[str]) -> dict[str, Any]:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at head."""
    _check_model(state, model)
    version = sync_to_head(state)
    rt = state.runtime
    logprobs = target_logprobs(rt.model, rt.tokenizer, prompts, targets)
    return {"logprobs": [float(x) for x in logprobs], "version": version}


def generate(state: WorkerState, model: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` at head."""
    _check_model(state, model)
    version = sync_to_head(state)
    rt = state.runtime
    return {
        "text": greedy_generate(rt.model, rt.tokenizer, prompt, max_new_tokens),
        "version": version,
    }
