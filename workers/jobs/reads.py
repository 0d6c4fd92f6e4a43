"""Score and generate: answered at the ledger's head, or the version asked for
(rebuilt from the ledger and hash-checked), while the API waits
(:func:`service.queue.call_read`). A text longer than the worker takes in tokens is
answered as a refusal (:mod:`workers.tokens`), which the API returns as a 422. While
the worker's start-up runs (statistics on the base weights), a read of another
version than the weights are at is answered as not possible yet (the API's 503)."""

from __future__ import annotations

from typing import Any

from workers import tokens
from workers.evaluation.scoring import generate as greedy_generate
from workers.evaluation.scoring import target_logprobs
from workers.startup import ledger_head, sync_to
from workers.state import WorkerState


class _NotYet(Exception):
    """The weights cannot move to the version asked for now."""


def _move(state: WorkerState, version: int | None) -> int:
    """Sync to ``version`` (None: the head); :class:`_NotYet` during the start-up."""
    target = ledger_head(state) if version is None else version
    if state.starting and target != state.runtime.current_version:
        raise _NotYet(
            "the worker is computing its statistics on the base weights; it answers "
            f"version {target} once it is ready"
        )
    return sync_to(state, target)


def _check_model(state: WorkerState, model: str) -> None:
    if model != state.name:
        raise RuntimeError(f"this worker serves {state.name!r}, not {model!r}")


def score(
    state: WorkerState,
    model: str,
    prompts: list[str],
    targets: list[str],
    version: int | None = None,
) -> dict[str, Any]:
    """Mean per-token log-probability of ``" " + target`` after each prompt, at
    ``version`` (default: the head)."""
    _check_model(state, model)
    rt = state.runtime
    limit = tokens.token_limit(rt.model, state.settings.max_prompt_tokens)
    try:
        tokens.check(rt.tokenizer, tokens.score_texts(prompts, targets), limit)
        version = _move(state, version)
    except tokens.PromptTooLong as exc:
        return tokens.refusal(exc)
    except _NotYet as exc:
        return {"unavailable": str(exc)}
    logprobs = target_logprobs(rt.model, rt.tokenizer, prompts, targets)
    return {"logprobs": [float(x) for x in logprobs], "version": version}


def generate(
    state: WorkerState, model: str, prompt: str, max_new_tokens: int, version: int | None = None
) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` at ``version`` (default: the head)."""
    _check_model(state, model)
    rt = state.runtime
    limit = tokens.token_limit(rt.model, state.settings.max_prompt_tokens)
    try:
        tokens.check_generate(rt.tokenizer, rt.model, prompt, max_new_tokens, limit)
        version = _move(state, version)
    except tokens.PromptTooLong as exc:
        return tokens.refusal(exc)
    except _NotYet as exc:
        return {"unavailable": str(exc)}
    return {
        "text": greedy_generate(rt.model, rt.tokenizer, prompt, max_new_tokens),
        "version": version,
    }
