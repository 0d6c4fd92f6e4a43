"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with
Discrete Key-Value Adaptors"): edits without touching a weight.

The model's version holds a codebook at one layer's MLP output projection f
(:mod:`workers.editing.common.codebook`): entries (key k, value v, radius ε, label y).
The runtime applies it in every forward pass: an input within ε of its nearest key
gets that key's value instead of f's output. An editor only computes the next
codebook from the current one (``ctx.state["grace"]``) and the requests; the model
comes back unchanged, and the delta carries the whole new codebook (a
:class:`~workers.editing.types.ModuleState`, which replaces the previous one).

Per request, in order (GRACE Alg. 1; mechanics as zjunlp/EasyEdit
``easyeditor/models/grace/GRACE.py``):

1. The query h is f's input at the prompt's last token; y is the token ids of
   " " + target_new. With i the nearest key at distance d:
   - empty codebook, or d > ε_init + εᵢ (the new ball would not touch entry i):
     **add** (h, f(h), ε_init, y);
   - same label: **expand** εᵢ to cover h when d > εᵢ ("coverage"; we add a relative
     margin of 1e-3 so that h stays inside when a forward with other padding or
     length computes it a few ulps off), and train vᵢ on this request;
   - another label: **split**: add (h, f(h), min(ε_init, d/2), y) and shrink εᵢ to
     min(εᵢ, d/2). (The paper and EasyEdit set both radii to d/2; taking the
     minimum never grows a ball on a conflict.) When d = 0, the same prompt now asks
     for another target: the entry is **relabelled** and its value trained anew.
2. The chosen entry's value (initialised from f's output at h: GRACE's "warm" start)
   is trained with Adam (``edit_lr``, at most ``n_iter`` steps) to minimise the mean
   NLL of the target's tokens after the prompt, with the candidate codebook applied
   exactly as the runtime will apply it (every position, nearest key, radius test).
   Training stops once the target's geometric-mean token probability reaches
   ``prob_threshold`` (ours; EasyEdit runs all ``n_iter`` steps).

A batch is processed request by request, each on the codebook its predecessors left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError
from workers.editing.common.codebook import Codebook, codebook_output, module_dims
from workers.editing.common.hooks import forward_hooks, frozen_eval, get_module, run_forward
from workers.editing.common.tokens import target_ids
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import GraceHParams
from workers.editing.types import EditContext, EditRequest, ModuleState
from workers.models.profiles import profile_for

STATE_NAME = "grace"
COVER_MARGIN = 1e-3  # relative margin of an expanded radius (see the module docstring)


class GraceEditor(Editor[GraceHParams]):
    name: ClassVar[str] = "grace"
    hparams_cls: ClassVar[type[GraceHParams]] = GraceHParams
    # a batch is one version; its requests enter the codebook one after another
    max_requests_per_delta: ClassVar[int | None] = None

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: GraceHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """The codebook after ``requests``; the model comes back unchanged."""
        profile = profile_for(model)
        layer = hparams.layers[0]
        n_layers = int(model.config.num_hidden_layers)
        if layer >= n_layers:
            raise EditError(f"layer {layer} is out of range: the model has {n_layers} layers")
        module_name = profile.mlp_out_module(layer)
        module = get_module(model, module_name)
        device = next(model.parameters()).device
        book = _current_codebook(ctx, module_name, module, device)
        entries: list[dict[str, Any]] = []
        with frozen_eval(model):
            for i, req in enumerate(requests):
                seq, pos, tgt = _encode(tok, req)
                key, init = _read_key(model, module_name, module, seq, pos, device)
                book, index, action, dist = place(book, key, init, tgt, hparams.eps_init)

                def report(f: float, m: str, _i: int = i) -> None:
                    ctx.progress((_i + f) / len(requests), m)

                book, steps, prob = train_value(
                    model, module, book, index, seq, pos, tgt, hparams, report
                )
                entries.append(
                    {"action": action, "index": index, "distance": dist, "steps": steps,
                     "target_prob": prob, "radius": float(book.radii[index])}
                )  # fmt: skip
        actions = [e["action"] for e in entries]
        return DeltaParts(
            summary=f"layer {layer}: {actions}, codebook {book.size} entries",
            modules={STATE_NAME: book.to_state()},
            meta={
                "layers": [layer],
                "module": module_name,
                "entries": entries,
                "codebook_size": book.size,
            },
        )


def _current_codebook(
    ctx: EditContext, module_name: str, module: nn.Module, device: torch.device
) -> Codebook:
    state = ctx.state.get(STATE_NAME)
    d_in, d_out = module_dims(module)
    if state is None:
        return Codebook.empty(module_name, d_in, d_out, device)
    if not isinstance(state, ModuleState):
        raise EditError(f"ctx.state[{STATE_NAME!r}] is not a module state")
    if state.module != module_name:
        raise EditError(
            f"the model's GRACE codebook sits at {state.module}, not {module_name}: "
            "edit with the layer it was built at (or roll back past its first edit)"
        )
    book = Codebook.from_state(state, device)
    if tuple(book.keys.shape[1:]) != (d_in,) or tuple(book.values.shape[1:]) != (d_out,):
        raise EditError(f"the GRACE codebook does not fit {module_name}")
    return book


def _encode(tok: PreTrainedTokenizerBase, req: EditRequest) -> tuple[list[int], int, list[int]]:
    """Prompt ids (with the tokenizer's special tokens) + target ids but the last (the
    teacher-forced input), the prompt's last position, and the target ids — the
    scoring convention of ``workers/evaluation/scoring.py``."""
    prompt = list(tok(req.text)["input_ids"])
    if not prompt:
        raise EditError(f"prompt {req.text!r} tokenises to nothing")
    tgt = target_ids(tok, req.target_new)
    return prompt + tgt[:-1], len(prompt) - 1, tgt


@torch.no_grad()
def _read_key(
    model: PreTrainedModel,
    module_name: str,
    module: nn.Module,
    seq: list[int],
    pos: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """f's input at ``pos`` (the key) and f's own output there (the warm value), from a
    forward pass that stops after f. The input does not depend on a codebook at f."""
    ids = torch.tensor([seq], dtype=torch.long, device=device)
    with forward_hooks(model, record_inputs=[module_name], stop_after=module_name) as seen:
        run_forward(model.base_model, input_ids=ids, use_cache=False)
    key = seen[f"in:{module_name}"][0, pos : pos + 1]
    return key[0].float(), module.forward(key)[0].float()


def place(
    book: Codebook, key: torch.Tensor, init: torch.Tensor, label: list[int], eps_init: float
) -> tuple[Codebook, int, str, float | None]:
    """GRACE's codebook update for one query (module docstring, step 1):
    (new codebook, index of the entry to train, action, distance to the nearest key)."""
    if book.size == 0:
        return book.with_entry(key, init, eps_init, label), 0, "add", None
    dist_t, idx_t = book.nearest(key.unsqueeze(0))
    dist, i = float(dist_t[0]), int(idx_t[0])
    radius = float(book.radii[i])
    if dist > eps_init + radius:
        return book.with_entry(key, init, eps_init, label), book.size, "add", dist
    if book.label_of(i) == list(label):
        if dist <= radius:
            return book, i, "inside", dist
        radii = book.radii.clone()
        radii[i] = dist * (1 + COVER_MARGIN)
        return Codebook(book.module, book.keys, book.values, radii, book.labels), i, "expand", dist
    if dist == 0.0:
        relabelled = book.with_label(i, label)
        values = relabelled.values.clone()
        values[i] = init.float()
        return (
            Codebook(book.module, book.keys, values, book.radii, relabelled.labels),
            i,
            "relabel",
            dist,
        )
    radii = book.radii.clone()
    radii[i] = min(radius, dist / 2)
    shrunk = Codebook(book.module, book.keys, book.values, radii, book.labels)
    return shrunk.with_entry(key, init, min(eps_init, dist / 2), label), book.size, "split", dist


@contextmanager
def _codebook_hook(
    module: nn.Module, keys: torch.Tensor, values: Callable[[], torch.Tensor], radii: torch.Tensor
) -> Iterator[None]:
    """Replace ``module``'s output by the codebook applied to its *own* output,
    recomputed from the input: whatever adaptor the runtime installed on the module
    (the current version's codebook) is overridden by the candidate one."""

    def hook(mod: nn.Module, args: tuple, _output: object) -> torch.Tensor:
        raw = mod.forward(args[0])
        out = codebook_output(keys, values(), radii, args[0], raw)
        return raw if out is None else out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def train_value(
    model: PreTrainedModel,
    module: nn.Module,
    book: Codebook,
    index: int,
    seq: list[int],
    pos: int,
    tgt: list[int],
    hp: GraceHParams,
    progress: Callable[[float, str], None],
) -> tuple[Codebook, int, float]:
    """Train entry ``index``'s value so that the prompt continues with ``tgt``
    (module docstring, step 2). Returns the codebook with the trained value, the
    gradient steps taken and the final target probability."""
    device = next(model.parameters()).device
    ids = torch.tensor([seq], dtype=torch.long, device=device)
    labels = torch.tensor(tgt, dtype=torch.long, device=device)
    read = torch.arange(pos, pos + len(tgt), device=device)  # position j predicts tgt[j − pos]
    value = book.values[index].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=hp.edit_lr)

    def values() -> torch.Tensor:
        return torch.cat([book.values[:index], value.unsqueeze(0), book.values[index + 1 :]])

    head = model.get_output_embeddings()
    steps, prob = 0, 0.0
    with _codebook_hook(module, book.keys, values, book.radii):
        for step in range(hp.n_iter + 1):
            with torch.enable_grad():
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                logp = torch.log_softmax(head(hidden[0, read]).float(), dim=-1)
                nll = -logp.gather(-1, labels.unsqueeze(-1)).mean()
            prob = float(torch.exp(-nll.detach()))
            progress(step / (hp.n_iter + 1), f"GRACE value step {step}: p(target) {prob:.3f}")
            if prob >= hp.prob_threshold or step == hp.n_iter:
                break
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
            steps = step + 1
    trained = book.values.clone()
    trained[index] = value.detach()
    return Codebook(book.module, book.keys, trained, book.radii, book.labels), steps, prob
