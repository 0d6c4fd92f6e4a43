"""Input checks shared by the API schemas and the ledger (no torch, no I/O).

- :func:`check_template` — an edit prompt holds exactly one ``{}`` where the
  subject goes, and no other format field (``"{} is located in"``), so that
  ``prompt.format(subject)`` is the sentence the model completes.
- :func:`check_complete_prompt` — paraphrase/neighbourhood/score prompts are full
  sentences: non-empty and without a ``{}`` placeholder.
- :func:`check_method` / :func:`check_hparams` — the method id and the user's
  hyper-parameter overrides, validated by the method's pydantic class in
  :mod:`workers.editing.hparams` (the editing library's hyper-parameters: torch-free,
  the one part of ``workers`` the API process imports; ``tests/service/test_imports.py``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, StringConstraints, ValidationError

from service.errors import InvalidInput
from workers.editing.hparams import METHODS, hparams_class

_FORMATTER = string.Formatter()


def check_template(prompt: str) -> str:
    """Return ``prompt`` if it has exactly one bare ``{}`` field; raise ``ValueError``.

    ``{{`` and ``}}`` are literal braces, as in :meth:`str.format`.
    """
    try:
        fields = [
            (name, spec, conv)
            for _, name, spec, conv in _FORMATTER.parse(prompt)
            if name is not None
        ]
    except ValueError as exc:
        raise ValueError(
            f"is not a valid template ({exc}); write the subject's place as {{}}"
        ) from None
    if any(name != "" or spec or conv for name, spec, conv in fields):
        raise ValueError("may hold only the {} placeholder, no named or numbered fields")
    if len(fields) != 1:
        raise ValueError(f"must contain exactly one {{}} for the subject (found {len(fields)})")
    if not prompt.replace("{}", "").strip():
        raise ValueError("must contain text besides the {} placeholder")
    return prompt


def check_complete_prompt(prompt: str) -> str:
    """Return ``prompt`` if it is a non-blank sentence without ``{}``; raise ``ValueError``."""
    if not prompt.strip():
        raise ValueError("must be a non-empty string")
    if "{}" in prompt:
        raise ValueError("is a complete prompt (the subject written out); it must not contain {}")
    return prompt


def known_methods() -> tuple[str, ...]:
    return METHODS


def check_method(method: str) -> str:
    """Return ``method`` if it is a known method id; raise :class:`InvalidInput` on ``method``."""
    methods = known_methods()
    if method not in methods:
        raise InvalidInput("method", f"unknown method {method!r}; known: {', '.join(methods)}")
    return method


def check_hparams(method: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate hyper-parameter overrides for ``method``; return them as a plain dict.

    Each key must be a field of the method's hparams class and its value must
    validate (type and range). Fields the user does not override (e.g. ``layers``,
    which defaults per architecture on the worker) are not required here. Errors
    name the key: ``InvalidInput("hparams.v_lr", ...)``.
    """
    if not overrides:
        return {}
    cls = hparams_class(check_method(method))
    known = set(cls.model_fields)
    for key in overrides:
        if key not in known:
            raise InvalidInput(
                f"hparams.{key}",
                f"unknown hyper-parameter for {method}; known: {', '.join(sorted(known))}",
            )
    try:
        cls.model_validate(dict(overrides))
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if err["type"] == "missing" and loc and loc[0] not in overrides:
                continue  # a default the worker fills in
            if not loc and len(overrides) == 1:
                loc = list(overrides)  # a whole-model check failed on the one key given
            field = ".".join(["hparams", *loc])
            raise InvalidInput(field, _strip_prefix(err["msg"])) from None
    return dict(overrides)


def _strip_prefix(msg: str) -> str:
    return msg.removeprefix("Value error, ")


MAX_TEXT = 2000  # characters in one prompt, subject or target

# the request text types of the edit and evaluation schemas
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT)]
Template = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=MAX_TEXT),
    AfterValidator(check_template),
]
CompletePrompt = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=MAX_TEXT),
    AfterValidator(check_complete_prompt),
]
