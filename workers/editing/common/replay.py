"""Re-running a model's upper blocks on fixed inputs, with some of their weights swapped.

When an optimisation changes only weights inside blocks ``first`` … N−1 (e.g.
fine-tuning one MLP projection), everything below block ``first`` is the same at
every step. :class:`BlockReplay` runs the whole model once (no cache, no gradients),
capturing with forward pre-hooks the exact positional and keyword arguments the base
model handed each block from ``first`` on (hidden states, masks, rotary embeddings,
position ids: whatever that architecture passes). A replay then calls those blocks
one after another on the captured arguments, threading the hidden state through and
substituting weights with :func:`torch.func.functional_call`, and applies the final
norm, reproducing the base model's ``last_hidden_state``. The hooks are removed
before the constructor returns; the model is only read.

:attr:`BlockReplay.exact` says whether a replay with the model's own weights equals
the plain forward (checked once at construction); a caller falls back to full
forwards if it does not (an architecture that does more after its block loop than
the final norm).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedModel

from workers.editing.common.hooks import first_tensor, get_module
from workers.models.profiles import ArchProfile


class BlockReplay:
    def __init__(
        self,
        model: PreTrainedModel,
        profile: ArchProfile,
        first: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> None:
        n_layers = int(model.config.num_hidden_layers)
        self.first = first
        self.blocks: list[nn.Module] = [
            get_module(model, profile.layer(i)) for i in range(first, n_layers)
        ]
        self.final_norm = get_module(model, profile.final_norm)
        self.inputs: list[tuple[tuple, dict]] = [((), {})] * len(self.blocks)
        handles = []

        def capture(index: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                self.inputs[index] = (args, dict(kwargs))

            return hook

        try:
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(capture(i), with_kwargs=True))
            with torch.no_grad():
                reference = model.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            replayed = self({})
        self.exact = replayed.shape == reference.shape and bool(
            torch.allclose(replayed, reference, rtol=1e-4, atol=1e-5)
        )

    def __call__(self, weights: Mapping[int, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The final hidden states [B, S, d] (after the final norm), with
        ``weights[layer]`` (names relative to that block) substituted in that block."""
        hidden = self.inputs[0][0][0]
        for i, block in enumerate(self.blocks):
            args, kwargs = self.inputs[i]
            args = (hidden, *args[1:])
            swapped = weights.get(self.first + i)
            out = (
                functional_call(block, dict(swapped), args, kwargs)
                if swapped
                else block(*args, **kwargs)
            )
            hidden = first_tensor(out)
        return self.final_norm(hidden)
