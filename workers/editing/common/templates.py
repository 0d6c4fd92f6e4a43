"""Context templates: short prefixes the model writes itself, placed before the prompt.

ROME (Meng et al. 2022, §3.1 eq. 3 and App. E.5) averages the key over such prefixes
so that the edit does not depend on the exact wording before the subject; MEMIT
(Meng et al. 2023, §4.2) does the same. A template is ``"<generated text>. {}"``;
the first template is always ``"{}"`` (the prompt alone). Generation is seeded
top-k sampling (k = 5 as the reference ``generate_fast``), batched. A worker supplies
``ctx.templates_provider``: templates sampled once from its *base* weights and kept on
disk, so that an edit does not depend on the edits before it or on a restart;
without one they are sampled from the model as it is and kept in ``ctx.cache``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.sampling import sample
from workers.editing.types import EditContext

log = logging.getLogger(__name__)

STARTERS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


Spec = tuple[tuple[int, int], ...]


def spec_of(spec: Sequence[Sequence[int]]) -> Spec:
    """``context_template_length_params`` as a hashable key."""
    return tuple((int(length), int(count)) for length, count in spec)


def context_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: Sequence[Sequence[int]],
    ctx: EditContext,
) -> list[str]:
    """``["{}"]`` plus, for each ``(length, count)`` in ``spec``, ``count`` prefixes of
    ``length`` tokens (starter word included) ending in ``". {}"``.

    With ``ctx.templates_provider`` (a worker: templates of the *base* model, the same
    after every restart) that decides; otherwise they are generated from ``model`` as
    it is now and kept in ``ctx.cache``."""
    key = spec_of(spec)
    if ctx.templates_provider is not None:
        return list(ctx.templates_provider(key, ctx.seed))
    cache_key = f"context_templates:{key!r}:seed={ctx.seed}"
    cached = ctx.cache.get(cache_key)
    if cached is not None:
        return list(cached)
    templates = generate_templates(model, tok, key, ctx.seed)
    ctx.cache[cache_key] = tuple(templates)
    return templates


def generate_templates(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: Spec, seed: int
) -> list[str]:
    """The templates of ``spec`` sampled from ``model`` with ``seed`` (no cache)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    templates = ["{}"]
    for length, count in spec:
        if count <= 0:
            continue
        starters = [STARTERS[i % len(STARTERS)] for i in range(count)]
        prompts = [tok(s)["input_ids"] for s in starters]
        n_new = max(1, int(length) - max(len(p) for p in prompts))
        ids, mask = sample(model, tok, prompts, n_new, generator=generator, top_k=5)
        for row, row_mask in zip(ids, mask, strict=True):
            text = tok.decode(row[row_mask.bool()].tolist(), skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").strip()
            templates.append(text + ". {}")
    log.info("context templates: %s", templates)
    return templates


class TemplateCache:
    """Context templates on disk, one JSON file per (spec, seed) under
    ``root / <model fingerprint> /``, and in memory once read: a worker samples them
    once from its base weights and every later edit, restart or worker on the same
    cache reuses them."""

    def __init__(self, root: Path | str, model_fingerprint: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_fingerprint):
            raise ValueError(f"model fingerprint {model_fingerprint!r} is not filename-safe")
        self.dir = Path(root) / model_fingerprint
        self._memory: dict[tuple[Spec, int], list[str]] = {}

    def path(self, spec: Spec, seed: int) -> Path:
        slug = "_".join(f"{length}x{count}" for length, count in spec) or "none"
        return self.dir / f"templates__{slug}__s{seed}.json"

    def get(self, spec: Spec, seed: int) -> list[str] | None:
        """The stored templates, or None."""
        found = self._memory.get((spec, seed))
        if found is None:
            path = self.path(spec, seed)
            if not path.is_file():
                return None
            found = self._memory[(spec, seed)] = list(json.loads(path.read_text())["templates"])
        return list(found)

    def get_or_generate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: Spec, seed: int
    ) -> list[str]:
        """The stored templates, or sampled from ``model`` (which must be the base
        the fingerprint names) and written atomically."""
        found = self.get(spec, seed)
        if found is not None:
            return found
        templates = generate_templates(model, tok, spec, seed)
        self.put(spec, seed, templates)
        return templates

    def put(self, spec: Spec, seed: int, templates: Sequence[str]) -> None:
        """Keep ``templates`` (e.g. read from the ledger) for ``spec`` and ``seed``."""
        path = self.path(spec, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"spec": spec, "seed": seed, "templates": list(templates)}))
        tmp.replace(path)
        self._memory[(spec, seed)] = list(templates)
