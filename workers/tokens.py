"""Prompt lengths in tokens, checked against the loaded model by its worker.

The API caps every text at :data:`service.validation.MAX_TEXT` characters, but only
the worker holds the tokenizer. Before a job computes anything, the worker counts the
tokens of every text it would run through the model and refuses one that is longer
than ``max_prompt_tokens`` (a setting) or than the model's context (for an edit,
less the context templates the methods put before it):

- an edit request: ``prompt.format(subject) + " " + target`` for ``target_new`` and
  ``target_true``, each paraphrase prompt with ``target_new`` and each neighbourhood
  prompt with ``target_true`` (the job fails with :class:`PromptTooLong`'s reason,
  naming the field; the other jobs of its batch go on);
- score: each ``prompt + " " + target``;
- generate: the prompt, and the prompt with ``max_new_tokens`` within the context.

Reads answer the refusal as a value (:func:`refusal`), which the API turns into a
``422`` naming the field (:func:`service.queue.call_read`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class PromptTooLong(ValueError):
    """A text is longer in tokens than the model's worker accepts."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def context_length(model: Any) -> int | None:
    """The model's context in tokens (its position embeddings), when it has one."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_limit(model: Any, max_prompt_tokens: int) -> int:
    """The most tokens one text may have: the setting, within the model's context."""
    context = context_length(model)
    return max_prompt_tokens if context is None else min(max_prompt_tokens, context)


def edit_limit(model: Any, max_prompt_tokens: int, hparams: Any) -> int:
    """:func:`token_limit` for an edit's texts, which the methods also run behind a
    context template of up to ``max(length)`` of ``context_template_length_params``
    tokens (and one to join them)."""
    lengths = [length for length, _ in getattr(hparams, "context_template_length_params", ())]
    context = context_length(model)
    if context is None or not lengths:
        return token_limit(model, max_prompt_tokens)
    return max(1, min(max_prompt_tokens, context - max(lengths) - 1))


def count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check(tokenizer: Any, texts: Iterable[tuple[str, str]], limit: int) -> None:
    """Raise :class:`PromptTooLong` for the first ``(field, text)`` over ``limit`` tokens."""
    for field, text in texts:
        n = count(tokenizer, text)
        if n > limit:
            raise _over(field, n, limit)


def _over(field: str, n: int, limit: int) -> PromptTooLong:
    return PromptTooLong(field, f"is {n} tokens long; this model's worker takes at most {limit}")


def edit_texts(index: int, request: Any) -> Iterator[tuple[str, str]]:
    """The texts of edit request number ``index`` (an object with the request's fields)."""
    at = f"requests.{index}"
    sentence = request.prompt.format(request.subject)
    yield f"{at}.target_new", f"{sentence} {request.target_new}"
    if request.target_true:
        yield f"{at}.target_true", f"{sentence} {request.target_true}"
    for j, p in enumerate(request.paraphrase_prompts or ()):
        yield f"{at}.paraphrase_prompts.{j}", f"{p} {request.target_new}"
    for j, p in enumerate(request.neighborhood_prompts or ()):
        yield f"{at}.neighborhood_prompts.{j}", f"{p} {request.target_true or ''}".rstrip()


def score_texts(prompts: Sequence[str], targets: Sequence[str]) -> Iterator[tuple[str, str]]:
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        yield f"prompts.{i}", f"{p} {t}"


def check_generate(
    tokenizer: Any, model: Any, prompt: str, max_new_tokens: int, limit: int
) -> None:
    """The prompt within ``limit``, and the prompt and its continuation within the context."""
    n = count(tokenizer, prompt)  # once, for both checks
    if n > limit:
        raise _over("prompt", n, limit)
    context = context_length(model)
    if context is not None and n + max_new_tokens > context:
        raise PromptTooLong(
            "max_new_tokens",
            f"the prompt's {n} tokens and {max_new_tokens} new ones exceed the "
            f"model's context of {context} tokens",
        )


def refusal(exc: PromptTooLong) -> dict[str, Any]:
    """How a read answers a refused text (the API raises it as a 422)."""
    return {"invalid": {"field": exc.field, "message": exc.message}}
