"""Fine-tuning baselines: FT-L (unconstrained) and FT-C (L∞-constrained).

Both tune the MLP output projection W of the chosen layers directly (no key/value
model, no statistics) with Adam on

    L(ΔW) = mean_i  mean_j −log P(t_ij | prompt_i, t_i<j ; W₀ + ΔW)

the mean per-token NLL of each request's ``" " + target_new`` after its prompt (as
the CounterFact metrics tokenise it), averaged over the batch, one full-batch step at
a time. This is EasyEdit's ``target_new`` objective (zjunlp/EasyEdit
``easyeditor/models/ft/ft_main.py``; its survey calls the last-prompt-token variant
FT-L and this one FT-M); ROME's own FT baseline (kmeng01/rome
``baselines/ft/ft_main.py``) uses the same Adam set-up.

- **FT-L** leaves ΔW free. Defaults: one layer at 21/32 of the depth, 25 steps, lr
  5e-4, no weight decay (EasyEdit ``hparams/FT/llama-7b.yaml``).
- **FT-C** (the "FT+L" baseline of Meng et al. 2022, ROME; after Zhu et al. 2020,
  "Modifying memories in transformer models") keeps ‖ΔW‖∞ ≤ ε by clamping every entry
  of ΔW to [−ε, ε] after each Adam step (a Euclidean projection onto the L∞ ball).
  ROME's presets (kmeng01/rome ``hparams/FT/*_constr.json``) tune layer 0 with ε = 5e-4
  for GPT-2 XL, 1e-3 GPT-2 large, 2e-3 GPT-2 medium, 5e-5 GPT-J; our default, layer 0
  and ε = 2e-3, is measured on SmolLM2 (``docs/editing.md``).

Training is early-stopped once every request's target tokens are each the most likely
next token (teacher-forced) and their mean probability exp(−NLL) reaches
``stop_prob``. (EasyEdit stops at a batch loss below 0.01, i.e. probability ≈ 0.99.)

The model itself is never written to: the trained variable is ΔW (fp32, initialised
to zero), and each forward pass substitutes ``cast(W₀ + ΔW)`` for the parameter
through :func:`torch.func.functional_call`. Only ΔW carries gradients; the update
returned is exactly the ΔW trained, a :class:`DenseUpdate` in the parameter's own
layout, which the runtime adds in fp32 as the forward passes here did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.base import EditError
from workers.editing.common.hooks import frozen_eval, get_parameter
from workers.editing.common.prompts import PromptRows, RowBuilder
from workers.editing.common.replay import BlockReplay
from workers.editing.common.tokens import target_ids
from workers.editing.editor import DeltaParts, Editor
from workers.editing.hparams import FtCHParams, FtLHParams
from workers.editing.types import DenseUpdate, EditContext, EditRequest
from workers.models.profiles import ArchProfile, profile_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FtSettings:
    """The fine-tuning knobs (a view of FT-L's / FT-C's hparams)."""

    num_steps: int
    lr: float
    stop_prob: float
    epsilon: float | None  # L∞ bound on ΔW; None: unconstrained


@dataclass
class FtResult:
    deltas: dict[str, torch.Tensor]  # parameter → ΔW (fp32, the parameter's layout)
    steps: int  # Adam steps taken
    stopped_early: bool
    loss: list[float]  # batch loss before each step and after the last one
    prob: list[float]  # per request: exp(−mean target NLL) at the end
    argmax: list[bool]  # per request: every target token the most likely at the end


def inner_bound(epsilon: float) -> float:
    """The largest float32 ≤ ``epsilon``: clamping to it bounds ΔW by ε exactly, also
    when ε itself is not representable in float32 (5e-4 rounds up)."""
    e = torch.tensor(epsilon, dtype=torch.float32)
    if float(e) > epsilon:
        e = torch.nextafter(e, torch.zeros_like(e))
    return float(e)


class _TargetLoss:
    """The batch ``prompt + target[:-1]`` and, per target token, where its logit is read."""

    def __init__(
        self,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        device: torch.device | str,
    ) -> None:
        rows: PromptRows = (
            RowBuilder().add_templates(tok, requests, ["{}"], "last", append_target=True).build(tok)
        )
        entries = []  # (row, position, label): position p predicts the token at p + 1
        for i, req in enumerate(requests):
            for j, label in enumerate(target_ids(tok, req.target_new)):
                entries.append((i, rows.prompt_len[i] - 1 + j, label))
        self.row, self.pos, self.label = torch.tensor(entries, device=device).T
        self.input_ids = rows.batch.input_ids.to(device)
        self.attention_mask = rows.batch.attention_mask.to(device)
        self.n = len(requests)
        self.count = torch.zeros(self.n, device=device).index_add_(
            0, self.row, torch.ones(self.row.shape[0], device=device)
        )

    def __call__(
        self, model: PreTrainedModel, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From the final hidden states [B, S, d]: per request, the mean NLL of its
        target tokens [n] (differentiable) and whether each of them is the argmax [n]."""
        logits = model.get_output_embeddings()(hidden[self.row, self.pos])
        logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
        nll = -logp.gather(-1, self.label.unsqueeze(-1)).squeeze(-1)
        req_nll = torch.zeros(self.n, device=nll.device).index_add(0, self.row, nll) / self.count
        wrong = (logp.detach().argmax(-1) != self.label).float()
        req_wrong = torch.zeros(self.n, device=nll.device).index_add_(0, self.row, wrong)
        return req_nll, req_wrong == 0


def _forward(
    model: PreTrainedModel,
    profile: ArchProfile,
    params: Sequence[str],
    batch: _TargetLoss,
    replay: bool,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``hidden(weights)``: the final hidden states of the batch with ``weights``
    (parameter name → tensor) substituted. Replays the blocks from the lowest tuned
    layer on (:class:`BlockReplay`) where that reproduces the model's forward, else
    runs the whole base model."""
    layer_of = {name: profile.layer_of_param(name) for name in params}
    if replay and None not in layer_of.values():
        run = BlockReplay(
            model, profile, min(layer_of.values()), batch.input_ids, batch.attention_mask
        )
        if run.exact:

            def hidden_replayed(weights: dict[str, torch.Tensor]) -> torch.Tensor:
                per_block: dict[int, dict[str, torch.Tensor]] = {}
                for name, w in weights.items():
                    layer = layer_of[name]
                    per_block.setdefault(layer, {})[name[len(profile.layer(layer)) + 1 :]] = w
                return run(per_block)

            return hidden_replayed
        log.warning("replaying the upper blocks does not reproduce the forward; running it all")
    prefix = model.base_model_prefix + "."
    for name in params:
        if not name.startswith(prefix):
            raise EditError(f"{name} is not a parameter of the base model {prefix[:-1]!r}")

    def hidden_full(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        swapped = {name[len(prefix) :]: w for name, w in weights.items()}
        return functional_call(model.base_model, swapped, (), kwargs).last_hidden_state

    return hidden_full


def finetune(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    params: Sequence[str],
    settings: FtSettings,
    progress: Callable[[float, str], None] | None = None,
    *,
    replay: bool = True,
) -> FtResult:
    """Adam on ΔW of ``params`` (see the module docstring); the model is only read.
    ``replay=False`` runs the whole model at every step (the reference path)."""
    originals = {name: get_parameter(model, name).detach() for name in params}
    device = next(iter(originals.values())).device
    deltas = {
        k: torch.zeros(w.shape, dtype=torch.float32, device=device, requires_grad=True)
        for k, w in originals.items()
    }
    opt = torch.optim.Adam(list(deltas.values()), lr=settings.lr)
    bound = None if settings.epsilon is None else inner_bound(settings.epsilon)
    objective = _TargetLoss(tok, requests, device)
    hidden = _forward(model, profile_for(model), params, objective, replay)
    losses: list[float] = []
    step = 0
    while True:
        with torch.enable_grad():
            weights = {k: (w.float() + deltas[k]).to(w.dtype) for k, w in originals.items()}
            req_nll, argmax = objective(model, hidden(weights))
            loss = req_nll.mean()
        losses.append(float(loss.detach()))
        prob = (-req_nll.detach()).exp()
        reached = bool((argmax & (prob >= settings.stop_prob)).all())
        if reached or step == settings.num_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if bound is not None:
            with torch.no_grad():
                for d in deltas.values():
                    d.clamp_(min=-bound, max=bound)
        if progress is not None:
            progress(step / settings.num_steps, f"ft step {step}: loss {losses[-1]:.3f}")
    return FtResult(
        deltas={k: d.detach().clone() for k, d in deltas.items()},
        steps=step,
        stopped_early=reached,
        loss=losses,
        prob=[float(p) for p in prob],
        argmax=[bool(a) for a in argmax],
    )


class _FtEditor(Editor[FtLHParams | FtCHParams]):
    """Shared by FT-L and FT-C; a subclass names the method and its constraint."""

    hparams_cls: ClassVar[type[FtLHParams] | type[FtCHParams]]

    def _epsilon(self, hparams: FtLHParams | FtCHParams) -> float | None:
        raise NotImplementedError

    def _compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        hparams: FtLHParams | FtCHParams,
        ctx: EditContext,
    ) -> DeltaParts:
        """One dense update per tuned parameter for the whole batch; the model comes
        back unchanged."""
        profile = profile_for(model)
        n_layers = int(model.config.num_hidden_layers)
        layers = sorted(hparams.layers)
        if layers[-1] >= n_layers:
            raise EditError(f"layer {layers[-1]} is out of range: the model has {n_layers} layers")
        params = [profile.mlp_out_param(layer) for layer in layers]
        settings = FtSettings(
            num_steps=hparams.num_steps,
            lr=hparams.lr,
            stop_prob=hparams.stop_prob,
            epsilon=self._epsilon(hparams),
        )
        ctx.progress(0.0, "fine-tuning")
        with frozen_eval(model):
            result = finetune(model, tok, requests, params, settings, progress=ctx.progress)
        summary = (
            f"{len(requests)} requests, layers {layers}: {result.steps} steps, "
            f"loss {result.loss[0]:.3f} → {result.loss[-1]:.3f}"
        )
        return DeltaParts(
            summary=summary,
            updates=[DenseUpdate(p, result.deltas[p]) for p in params],
            meta={
                "layers": layers,
                "steps": result.steps,
                "stopped_early": result.stopped_early,
                "loss": result.loss,
                "target_prob": result.prob,
                "target_argmax": result.argmax,
                "max_abs_delta": [float(result.deltas[p].abs().max()) for p in params],
                "norm_constraint": settings.epsilon,
            },
        )


class FtLEditor(_FtEditor):
    name: ClassVar[str] = "ft_l"
    hparams_cls: ClassVar[type[FtLHParams]] = FtLHParams

    def _epsilon(self, hparams: FtLHParams) -> float | None:
        return None


class FtCEditor(_FtEditor):
    name: ClassVar[str] = "ft_c"
    hparams_cls: ClassVar[type[FtCHParams]] = FtCHParams

    def _epsilon(self, hparams: FtCHParams) -> float | None:
        return hparams.norm_constraint
