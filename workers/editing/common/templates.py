"""Context templates: short prefixes the model writes itself, placed before the prompt.

ROME (Meng et al. 2022, §3.1 eq. 3 and App. E.5) averages the key over such prefixes
so that the edit does not depend on the exact wording before the subject; MEMIT
(Meng et al. 2023, §4.2) does the same. A template is ``"<generated text>. {}"``;
the first template is always ``"{}"`` (the prompt alone). Generation is seeded
top-k sampling (k = 5 as the reference ``generate_fast``), batched, and cached in
``ctx.cache`` so that every edit of a worker uses the same templates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.sampling import sample
from workers.editing.types import EditContext

log = logging.getLogger(__name__)

STARTERS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: Sequence[Sequence[int]],
    ctx: EditContext,
) -> list[str]:
    """``["{}"]`` plus, for each ``(length, count)`` in ``spec``, ``count`` prefixes of
    ``length`` tokens (starter word included) ending in ``". {}"``."""
    key = "context_templates:" + repr(tuple(tuple(int(x) for x in pair) for pair in spec))
    key += f":seed={ctx.seed}"
    cached = ctx.cache.get(key)
    if cached is not None:
        return list(cached)
    generator = torch.Generator(device="cpu").manual_seed(ctx.seed)
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
    ctx.cache[key] = tuple(templates)
    return templates
