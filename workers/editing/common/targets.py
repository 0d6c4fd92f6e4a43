"""Target vectors: the change δ of a hidden vector that makes the model say target_new.

ROME (Meng et al. 2022, eq. 4) and MEMIT (Meng et al. 2023, eq. 16) optimise
v* = v₀ + δ, where δ is added to ``module``'s output at the subject's last token in
every context-template prompt, minimising

    L(δ) = mean_j −log P(target | x_j + p)                       (target NLL, per token)
         + kl_factor · KL(P_δ[· | s is a] ‖ P[· | s is a])           (essence drift)
         + v_weight_decay · ‖δ‖ / ‖v₀‖²                              (as the reference code)

with ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ after each Adam step. A request that supersedes
an earlier edit (``EditRequest.suppress``: the old target a and the ceiling c_a, its
mean log-probability before that edit) adds, per template prompt,

         + max(0, mean_j log P(a | x_j + p) − (c_a − SUPPRESS_MARGIN))     (unlikelihood)

and stops only once every suppressed target is under its ceiling too. Several requests are
optimised together in one batch: the loss is a sum of independent per-request
terms and Adam acts element-wise, so each δᵢ follows the same trajectory as alone.
A request stops (its δ frozen, its rows dropped from the batch) once the mean
probability of its target over its prompts, and that on its own prompt (template 0),
reach ``v_prob_threshold``.

Speed: only δ carries gradients (the weights are frozen). Every position before a
row's subject token is unaffected by δ (causal attention), so it is computed once
and kept as a KV cache; each optimisation step runs only the tokens from the
subject's last token on (a handful per prompt instead of the whole prefix), and of
those only through the blocks from the one where δ is added: the blocks below it
cannot see δ, so their suffix output is computed once and replayed. Logits are
computed only at the positions the loss reads.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.hooks import forward_hooks, get_module, replace_first, run_forward
from workers.editing.common.prompts import PromptRows, RowBuilder
from workers.editing.common.tokens import pad_id, target_ids
from workers.editing.types import EditRequest
from workers.models.profiles import ArchProfile

log = logging.getLogger(__name__)

KL_PROMPTS: tuple[str, ...] = ("{} is a",)
# nats below its ceiling that a suppressed target is pushed to while optimising (the
# edit's δ is spread over several layers afterwards, which loses a little of it)
SUPPRESS_MARGIN = 0.5


@dataclass(frozen=True)
class TargetSettings:
    """The v* optimisation knobs (a view of the method's hparams)."""

    steps: int
    lr: float
    loss_layer: int
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    prob_threshold: float
    fact_token: str


@dataclass
class TargetResult:
    delta: torch.Tensor  # [n, d] fp32, the optimised δ per request
    init: torch.Tensor  # [n, d] fp32, v₀: the module's output on the bare prompt
    steps: list[int] = field(default_factory=list)  # steps each request took
    prob: list[float] = field(default_factory=list)  # final mean target probability


class _SplitRun:
    """Rows cut at their subject token: the prefix run once into a KV cache, the
    suffix (subject token onwards) run on demand. Suffix position 0 of every row is
    its subject token.

    ``replay`` names the leading blocks (layers 0 … L−1 below the block where δ is
    added) whose suffix outputs cannot depend on δ: they are computed once here, and
    inside :meth:`replaying` those blocks return the recorded output instead of
    running (their KV cache is not extended, which only the skipped blocks read)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        rows: PromptRows,
        row_ids: torch.Tensor,
        replay: Sequence[str] = (),
    ):
        device = next(model.parameters()).device
        self.model = model
        self.replay = list(replay)
        self.replayed: torch.Tensor | None = None
        self._structure: dict[str, object] = {}
        ids, mask = rows.batch.input_ids[row_ids.cpu()], rows.batch.attention_mask[row_ids.cpu()]
        cut = rows.lookup[row_ids.cpu()]
        length = mask.sum(-1)
        b, p, s = len(row_ids), int(cut.max()), int((length - cut).max())
        pad = pad_id(tok)
        pre_ids = torch.full((b, p), pad, dtype=torch.long)
        pre_mask = torch.zeros((b, p), dtype=torch.long)
        pre_pos = torch.zeros((b, p), dtype=torch.long)
        suf_ids = torch.full((b, s), pad, dtype=torch.long)
        suf_mask = torch.zeros((b, s), dtype=torch.long)
        for i in range(b):
            c, n = int(cut[i]), int(length[i])
            if c:  # prefix left-padded, so that every row's suffix follows position p
                pre_ids[i, p - c :] = ids[i, :c]
                pre_mask[i, p - c :] = 1
                pre_pos[i, p - c :] = torch.arange(c)
            suf_ids[i, : n - c] = ids[i, c:n]
            suf_mask[i, : n - c] = 1
        self.suffix_ids = suf_ids.to(device)
        self.suffix_pos = (cut.unsqueeze(1) + torch.arange(s)).to(device)
        self.full_mask = torch.cat([pre_mask, suf_mask], dim=1).to(device)
        self.cache = None
        if p:
            with torch.no_grad():
                out = model.base_model(
                    input_ids=pre_ids.to(device),
                    attention_mask=pre_mask.to(device),
                    position_ids=pre_pos.to(device),
                    use_cache=True,
                )
            self.cache = out.cache
        if self.replay:
            last = self.replay[-1]
            with (  # structure hooks first: the stop hook on ``last`` raises
                torch.no_grad(),
                _recording_structure(model, self.replay, self._structure),
                forward_hooks(model, record_outputs=[last], stop_after=last) as seen,
            ):
                run_forward(model.base_model, **self.inputs())
            self.replayed = seen[f"out:{last}"].detach()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Blocks in ``replay`` return the recorded output (the last) or pass their
        input through (the others) instead of running."""
        if not self.replay:
            yield
            return
        assert self.replayed is not None
        modules = [get_module(self.model, name) for name in self.replay]
        last = len(modules) - 1

        def fake(i: int, name: str) -> Callable[..., object]:
            def forward(*args: object, **kwargs: object) -> object:
                hidden = args[0] if args else kwargs["hidden_states"]
                out = self.replayed if i == last else hidden
                return replace_first(self._structure[name], out)

            return forward

        saved = [module.__dict__.get("forward") for module in modules]
        try:
            for i, (name, module) in enumerate(zip(self.replay, modules, strict=True)):
                module.forward = fake(i, name)
            yield
        finally:
            for module, old in zip(modules, saved, strict=True):
                if old is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = old  # e.g. an accelerate wrapper

    @property
    def size(self) -> int:
        return int(self.suffix_ids.shape[0])

    def keep(self, rows: torch.Tensor) -> bool:
        """Keep only ``rows`` (local indices); False if the cache cannot be cut."""
        if self.cache is not None:
            select = getattr(self.cache, "batch_select_indices", None)
            if select is None:
                return False
            select(rows)
        self.suffix_ids = self.suffix_ids[rows]
        self.suffix_pos = self.suffix_pos[rows]
        self.full_mask = self.full_mask[rows]
        if self.replayed is not None:
            self.replayed = self.replayed[rows]
        return True

    def inputs(self) -> dict[str, object]:
        return {
            "input_ids": self.suffix_ids,
            "attention_mask": self.full_mask,
            "position_ids": self.suffix_pos,
            "cache": copy.deepcopy(self.cache) if self.cache is not None else None,
            "use_cache": self.cache is not None,
        }


@contextmanager
def _recording_structure(
    model: PreTrainedModel, names: Sequence[str], into: dict[str, object]
) -> Iterator[None]:
    """Record the output structure (tensor or tuple) of each named block."""

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _args: tuple, output: object) -> None:
            into[name] = output if isinstance(output, torch.Tensor) else tuple(output)

        return record

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def replay_blocks(profile: ArchProfile, module: str) -> list[str]:
    """The blocks below the one holding ``module`` (δ is added inside or at the
    output of that block, so nothing below it depends on δ)."""
    layer = profile.layer_of_param(module)
    return [] if layer is None else [profile.layer(i) for i in range(layer)]


def optimise_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    profile: ArchProfile,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    module: str,
    settings: TargetSettings,
    progress: Callable[[float, str], None] | None = None,
) -> TargetResult:
    """Optimise δ at ``module``'s output (see the module docstring)."""
    device = next(model.parameters()).device
    n, t = len(requests), len(templates)
    # the suppressed targets, as requests of their own: (owner, target, ceiling)
    suppressed = [(i, a, c) for i, req in enumerate(requests) for a, c in req.suppress]
    builder = (
        RowBuilder()
        .add_templates(tok, requests, templates, settings.fact_token, append_target=True)
        .add_subject_prompts(tok, requests, KL_PROMPTS, settings.fact_token)
    )
    sup_requests = [replace(requests[i], target_new=a, suppress=()) for i, a, _ in suppressed]
    builder.add_templates(tok, sup_requests, templates, settings.fact_token, append_target=True)
    rows = builder.build(tok)
    kl_first = n * t  # one KL row per request follows the rewriting rows
    sup_first = kl_first + n  # then t rows per suppressed target
    for k, (i, _, _) in enumerate(suppressed):  # the rows belong to the superseding request
        rows.owner[sup_first + k * t : sup_first + (k + 1) * t] = i
    # loss entries (row, suffix position, label): a rewriting row predicts the target
    entries = []
    for i, req in enumerate(requests):
        entries += _target_entries(tok, rows, req.target_new, range(i * t, (i + 1) * t))
    loss_row, loss_pos, loss_label = torch.tensor(entries, device=device).T
    sup_entries = []
    for k, (_, a, _) in enumerate(suppressed):
        sup_entries += _target_entries(tok, rows, a, range(sup_first + k * t, sup_first + (k + 1) * t))  # fmt: skip
    if sup_entries:
        sup_row, sup_pos, sup_label = torch.tensor(sup_entries, device=device).T
    # each suppressed row's ceiling (its target's, less the margin)
    ceiling = torch.zeros(rows.size, device=device)
    for k, (_, _, c) in enumerate(suppressed):
        ceiling[sup_first + k * t : sup_first + (k + 1) * t] = float(c) - SUPPRESS_MARGIN
    kl_row = torch.arange(kl_first, sup_first, device=device)
    kl_pos = torch.tensor(
        [rows.prompt_len[r] - 1 - int(rows.lookup[r]) for r in range(kl_first, sup_first)],
        device=device,
    )
    owner = rows.owner.to(device)

    width = _module_width(model, module)
    delta = torch.zeros(n, width, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    init = torch.zeros(n, width, device=device)
    kl_init = torch.zeros(n, model.config.vocab_size, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps, prob = [settings.steps] * n, [0.0] * n
    run: _SplitRun | None = None
    local = torch.arange(rows.size, device=device)  # global row id → index in ``run``

    for step in range(settings.steps):
        act_rows = active[owner].nonzero().squeeze(-1)  # global row ids, ascending
        shrunk = run is not None and run.size != act_rows.numel()
        if run is None or (shrunk and not run.keep(local[act_rows])):
            run = _SplitRun(model, tok, rows, act_rows, replay_blocks(profile, module))
        local = torch.full((rows.size,), -1, dtype=torch.long, device=device)
        local[act_rows] = torch.arange(act_rows.numel(), device=device)

        def add_delta(out: torch.Tensor, act_rows=act_rows, first=step == 0) -> torch.Tensor:
            if first:  # δ = 0 still: record v₀ on the bare-prompt rows
                bare = (act_rows % t == 0) & (act_rows < kl_first)
                init[owner[act_rows[bare]]] = out[bare, 0].detach().float()
            shifted = out[:, :1] + delta[owner[act_rows]].to(out.dtype).unsqueeze(1)
            return torch.cat([shifted, out[:, 1:]], dim=1)

        with torch.enable_grad():
            hidden = _final_hidden(model, profile, run, settings.loss_layer, module, add_delta)
            sel = active[owner[loss_row]]
            lr_, lp_, ll_ = loss_row[sel], loss_pos[sel], loss_label[sel]
            logp = _log_probs(model, hidden[local[lr_], lp_])
            nll_tok = -logp.gather(-1, ll_.unsqueeze(-1)).squeeze(-1)
            # per row: mean NLL over the target's tokens; per request: mean over its rows
            row_sum = torch.zeros(rows.size, device=device).index_add(0, lr_, nll_tok)
            row_cnt = torch.zeros(rows.size, device=device).index_add(
                0, lr_, torch.ones_like(nll_tok)
            )
            rew = act_rows[act_rows < kl_first]
            row_nll = row_sum[rew] / row_cnt[rew]
            req_nll = torch.zeros(n, device=device).index_add(0, owner[rew], row_nll) / t
            row_prob = (-row_nll.detach()).exp()
            req_prob = torch.zeros(n, device=device).index_add(0, owner[rew], row_prob) / t
            # the request's own prompt (template 0) must reach the threshold too
            bare_rows = rew % t == 0
            bare_prob = torch.zeros(n, device=device)
            bare_prob[owner[rew[bare_rows]]] = row_prob[bare_rows]
            kl_act = kl_row[active[owner[kl_row]]]
            kl_logp = _log_probs(model, hidden[local[kl_act], kl_pos[kl_act - kl_first]])
            if step == 0:
                kl_init[owner[kl_act]] = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init[owner[kl_act]])).sum(-1)  # KL(P_δ ‖ P)
            req_kl = torch.zeros(n, device=device).index_add(0, owner[kl_act], kl)
            decay = (
                settings.weight_decay * delta.norm(dim=-1) / init.norm(dim=-1).clamp_min(1e-8) ** 2
            )
            req_sup = torch.zeros(n, device=device)
            above = torch.zeros(n, dtype=torch.bool, device=device)  # a target over its ceiling
            if sup_entries:
                sel = active[owner[sup_row]]
                sr_, sp_, sl_ = sup_row[sel], sup_pos[sel], sup_label[sel]
                s_logp = _log_probs(model, hidden[local[sr_], sp_]).gather(-1, sl_.unsqueeze(-1)).squeeze(-1)  # fmt: skip
                s_sum = torch.zeros(rows.size, device=device).index_add(0, sr_, s_logp)
                s_cnt = torch.zeros(rows.size, device=device).index_add(0, sr_, torch.ones_like(s_logp))  # fmt: skip
                sup_act = act_rows[act_rows >= sup_first]
                row_lp = s_sum[sup_act] / s_cnt[sup_act]  # mean log p of the target per row
                excess = (row_lp - ceiling[sup_act]).clamp_min(0.0)
                req_sup = req_sup.index_add(0, owner[sup_act], excess / t)
                above = above.index_fill(0, owner[sup_act][excess.detach() > 0], True)
            loss = (req_nll + settings.kl_factor * req_kl + decay + req_sup)[active].sum()

        still = active.clone()  # ``active`` itself is part of the autograd graph
        for i in active.nonzero().squeeze(-1).tolist():
            prob[i] = float(req_prob[i])
            if min(prob[i], float(bare_prob[i])) >= settings.prob_threshold and not bool(above[i]):
                still[i] = False
                steps[i] = step
        if progress is not None:
            progress((step + 1) / settings.steps, f"v* step {step}: {float(loss.detach()):.3f}")
        log.debug("v* step %d loss %.4f active %d", step, float(loss.detach()), int(still.sum()))
        if not bool(still.any()) or step == settings.steps - 1:
            break
        frozen = delta.detach()[~still].clone()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        active = still
        with torch.no_grad():
            delta[~active] = frozen
            max_norm = settings.clamp_norm_factor * init.norm(dim=-1, keepdim=True)
            norm = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    return TargetResult(delta=delta.detach().clone(), init=init, steps=steps, prob=prob)


def _target_entries(
    tok: PreTrainedTokenizerBase, rows: PromptRows, target: str, row_ids: range
) -> list[tuple[int, int, int]]:
    """(row, suffix position, label) of each token of ``target`` on rows ``row_ids``
    (each a prompt continued with the target but its last token)."""
    tgt = target_ids(tok, target)
    out = []
    for r in row_ids:
        first = rows.prompt_len[r] - 1 - int(rows.lookup[r])
        out += [(r, first + j, label) for j, label in enumerate(tgt)]
    return out


def _module_width(model: PreTrainedModel, module: str) -> int:
    mod = get_module(model, module)
    weight = getattr(mod, "weight", None)
    if weight is not None and weight.dim() == 2:
        # Linear stores [out, in]; GPT-2's Conv1D stores [in, out] and has ``nf`` = out
        return int(getattr(mod, "nf", weight.shape[0]))
    return int(model.config.hidden_size)


def _final_hidden(
    model: PreTrainedModel,
    profile: ArchProfile,
    run: _SplitRun,
    loss_layer: int,
    module: str,
    add_delta: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Suffix hidden states [B, S, d] after the final norm, read at ``loss_layer`` (the
    last layer: the model's own output; an earlier one: its block output through
    the final norm, as a logit lens)."""
    if loss_layer >= int(model.config.num_hidden_layers) - 1:
        with forward_hooks(model, edit_outputs={module: add_delta}), run.replaying():
            return model.base_model(**run.inputs()).last_hidden_state
    block = profile.layer(loss_layer)
    with (
        forward_hooks(
            model, edit_outputs={module: add_delta}, record_outputs=[block], stop_after=block
        ) as seen,
        run.replaying(),
    ):
        run_forward(model.base_model, **run.inputs())
    return get_module(model, profile.final_norm)(seen[f"out:{block}"])


def _log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    return torch.log_softmax(logits.to(torch.float32), dim=-1)
