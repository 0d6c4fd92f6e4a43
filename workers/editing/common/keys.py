"""Keys k: the input of a layer's MLP output projection at the subject's last token.

ROME (Meng et al. 2022, eq. 3) and MEMIT (Meng et al. 2023, eq. 14) use the key
averaged over context-template prefixes, k* = (1/N) Σ_j k(x_j + s). The same pass
also returns the projection's mean output (W k* + b, linear in k) and, for MEMIT,
the hidden state at the top edited layer on the bare prompt (h^L).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.hooks import forward_hooks, run_forward
from workers.editing.common.prompts import RowBuilder
from workers.editing.types import EditRequest

CHUNK_ROWS = 256


@dataclass
class Readout:
    keys: torch.Tensor  # [n, d_in] fp32, k* per request
    outputs: torch.Tensor  # [n, d_out] fp32, mean projection output per request
    hidden: torch.Tensor | None  # [n, d] fp32, ``hidden_module`` output on the bare prompt


@torch.no_grad()
def read_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    module: str,
    fact_token: str,
    hidden_module: str | None = None,
    stop_after: str | None = None,
) -> Readout:
    """Template-averaged input and output of ``module`` at each request's subject.

    ``hidden_module`` (a block) is read on template 0 rows only; ``stop_after``
    names the deepest module needed (default ``hidden_module or module``), after
    which the forward pass ends.
    """
    rows = RowBuilder().add_templates(tok, requests, templates, fact_token).build(tok)
    device = next(model.parameters()).device
    n, t = len(requests), len(templates)
    keys_sum: torch.Tensor | None = None
    outs_sum: torch.Tensor | None = None
    hidden = [None] * n
    last = stop_after or hidden_module or module
    outputs = [module] + ([hidden_module] if hidden_module else [])
    for start in range(0, rows.size, CHUNK_ROWS):
        sl = slice(start, start + CHUNK_ROWS)
        batch = rows.batch.select(torch.arange(rows.size)[sl]).to(device)
        with forward_hooks(
            model, record_inputs=[module], record_outputs=outputs, stop_after=last
        ) as seen:
            run_forward(
                model.base_model,
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
            )
        r = torch.arange(batch.input_ids.shape[0], device=device)
        pos = rows.lookup[sl].to(device)
        owner = rows.owner[sl].to(device)
        k = seen[f"in:{module}"][r, pos].to(torch.float32)
        v = seen[f"out:{module}"][r, pos].to(torch.float32)
        if keys_sum is None:
            keys_sum = torch.zeros(n, k.shape[-1], device=device)
            outs_sum = torch.zeros(n, v.shape[-1], device=device)
        keys_sum.index_add_(0, owner, k)
        outs_sum.index_add_(0, owner, v)
        if hidden_module:
            h = seen[f"out:{hidden_module}"][r, pos].to(torch.float32)
            for j, row in enumerate(range(start, min(start + CHUNK_ROWS, rows.size))):
                if row % t == 0:
                    hidden[row // t] = h[j]
    return Readout(
        keys=keys_sum / t,
        outputs=outs_sum / t,
        hidden=torch.stack(hidden) if hidden_module else None,
    )
