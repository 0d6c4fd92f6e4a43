"""Hyper-parameters of the editing methods: validated per-edit data, stored in the ledger.

This module imports no torch: the API process validates user overrides with it.
Device, dtype and file locations are settings, never hyper-parameters; layer paths
come from ``workers/models/profiles.py``.

Defaults and their sources (see ``docs/editing.md`` for the measurements):

- v* optimisation (``v_*``, ``clamp_norm_factor``, ``kl_factor``): ROME (Meng et al.
  2022, App. E.5; kmeng01/rome ``hparams/ROME/gpt2-xl.json``), MEMIT (Meng et al.
  2023, App. B; kmeng01/memit ``hparams/MEMIT/gpt-j-6B.json``) and EasyEdit's LLaMA
  presets (zjunlp/EasyEdit ``hparams/{ROME,MEMIT}/llama-7b.yaml``: 25 steps, lr 0.5,
  clamp 4, KL 0.0625, weight decay 1e-3), except two knobs measured on SmolLM2-135M
  (``docs/editing.md``, "Speed defaults"): Adam lr 1.0 (their 0.5) and three generated
  context prefixes (their five), which together cut the v* cost by ~40 % at equal
  ES/PS/NS. ``v_prob_threshold`` (early stop) is ours, tuned on SmolLM2-135M.
- λ (``mom2_update_weight``): MEMIT's 15,000 was set for GPT-J / LLaMA-7B MLP widths
  (16,384 / 11,008). A key drawn from the statistics has E[kᵀC⁻¹k] = d_mlp, so the
  balance between λ·C and an edit key's k kᵀ scales with d_mlp / λ; we keep
  LLaMA-7B's ratio, λ = 15,000 · d_mlp / 11,008 (2,093 for SmolLM2's 1,536; this is
  the "λ-scaled" row of PEERS.md, ES 1.00 where 15,000 reaches 0.64).
- Layers: ROME's causal-tracing layer sits at ~15 % of the depth for GPT-J/LLaMA
  (5 of 28/32) and ~35 % for GPT-2 XL (17 of 48); MEMIT edits a window of 5 layers
  around it (GPT-J 3–8, LLaMA-7B 4–8, GPT-2 XL 13–17). Measured on SmolLM2 (30 layers): see
  :data:`_MEASURED_LAYERS`.
- GRACE (:class:`GraceHParams`): EasyEdit's GRACE presets (zjunlp/EasyEdit
  ``hparams/GRACE/llama-7b.yaml``), the layer scaled to the depth (27 of 32 → 25 of 30,
  as PEERS.md ran it on SmolLM2).
- Fine-tuning baselines (``ft_l``, ``ft_c``): Adam at lr 5e-4, no weight decay, one
  MLP output projection (zjunlp/EasyEdit ``hparams/FT/llama-7b.yaml``: layer 21 of 32;
  kmeng01/rome ``hparams/FT/*.json``, the ROME paper's FT and FT+L baselines, same
  lr), at most 100 steps where the presets run 25: a single edit stops early within
  ~30 either way, a batch of 16 needs ~75 (measured, ``docs/editing.md``). FT-C's L∞ bound ε: ROME's presets use 5e-4
  (GPT-2 XL), 1e-3 (GPT-2 large), 2e-3 (GPT-2 medium), 5e-5 (GPT-J), all at layer 0;
  ours is measured on SmolLM2 (``docs/editing.md``). ``stop_prob`` (early stop) is
  ours; EasyEdit stops at a loss below 0.01.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

log = logging.getLogger(__name__)

# LLaMA-7B's MLP width and MEMIT λ (zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml)
_REF_D_MLP = 11008
_REF_LAMBDA = 15000.0
# FT-C's L∞ bound ε (see the module docstring and docs/editing.md)
_FT_C_EPSILON = 4e-3
# EMMET's λ for a LLaMA (zjunlp/EasyEdit hparams/EMMET/llama3.2-3b.yaml), scaled alike
_REF_EMMET_LAMBDA = 100000.0


class MethodHParams(BaseModel):
    """Base of every method's hyper-parameters: frozen, unknown keys rejected.

    A subclass sets ``method: Literal["<id>"] = "<id>"`` and implements
    :meth:`defaults` (its per-architecture defaults, sources cited).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] = Field(min_length=1, description="edited layers (0-based)")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        raise NotImplementedError

    @model_validator(mode="after")
    def _check_layers(self) -> Self:
        if any(layer < 0 for layer in self.layers):
            raise ValueError("layers must be non-negative")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be distinct")
        return self


class _EditHParams(MethodHParams):
    """Knobs shared by the locate-then-edit methods (ROME, MEMIT, …): a target vector
    v* optimised per request (ROME eq. 4) and key statistics C."""

    fact_token: Literal["subject_last", "last"] = "subject_last"
    # v* optimisation (ROME eq. 4 / MEMIT eq. 16)
    v_num_grad_steps: int = Field(25, ge=1, le=1000)
    v_lr: float = Field(1.0, gt=0)
    v_loss_layer: int | None = Field(None, description="None: the last layer")
    v_weight_decay: float = Field(1e-3, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0)
    kl_factor: float = Field(0.0625, ge=0)
    v_prob_threshold: float = Field(
        0.9, gt=0, le=1, description="stop a request's v* optimisation at this target prob."
    )
    # [length, count] pairs of generated prefixes; "{}" alone is always added
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 3),)
    # second-moment statistics C = E[k kᵀ]
    mom2_adjustment: bool = True
    mom2_dataset: str = Field(
        "self",
        description="'self' (text the model samples), 'hf:<name>[:<config>[:<split>]]' "
        "or 'file:<path>' (local text files)",
    )
    mom2_n_samples: int = Field(512, ge=1, description="sequences in the statistics corpus")
    mom2_sample_tokens: int = Field(64, ge=2, le=4096, description="tokens per sequence")

    @model_validator(mode="after")
    def _check(self) -> Self:
        for pair in self.context_template_length_params:
            if pair[0] < 1 or pair[1] < 0:
                raise ValueError("context_template_length_params: [length ≥ 1, count ≥ 0]")
        return self


class _RomeHParams(_EditHParams):
    """ROME's knobs (both formulations): one layer, rank one."""

    @model_validator(mode="after")
    def _one_layer(self) -> Self:
        if len(self.layers) != 1:
            raise ValueError("ROME edits exactly one layer")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(layers=(causal_layer(model_type, num_layers),), v_loss_layer=num_layers - 1)


class RomeHParams(_RomeHParams):
    """ROME with the r-ROME key fix (Gupta et al. 2024): one layer, rank one."""

    method: Literal["rome"] = "rome"


class RomeOriginalHParams(_RomeHParams):
    """ROME as the original code computes it (Meng et al. 2022, kmeng01/rome), without
    the r-ROME key fix: kept to reproduce the disabling edits (issue 4). Same knobs and
    defaults as ``rome``; ``workers/editing/rome.py`` says what differs."""

    method: Literal["rome_original"] = "rome_original"


class MemitHParams(_EditHParams):
    """MEMIT (Meng et al. 2023): a batch spread over a window of layers."""

    method: Literal["memit"] = "memit"
    mom2_update_weight: float = Field(2093.0, gt=0, description="λ in (λC + KKᵀ)⁻¹")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(
            layers=layer_window(model_type, num_layers),
            v_loss_layer=num_layers - 1,
            mom2_update_weight=scaled_lambda(d_mlp),
        )


class EmmetHParams(_EditHParams):
    """EMMET (Gupta et al. 2024, "A unified framework for model editing"): MEMIT's
    window loop with the equality-constrained solve ΔW = R (KᵀC'⁻¹K + δI)⁻¹ KᵀC'⁻¹,
    C' = λC + ρI (λ ``mom2_update_weight``, ρ ``update_norm_lambda``, δ
    ``emmet_lambda``; zjunlp/EasyEdit ``easyeditor/models/emmet``).

    Defaults: δ = 0.1 and ρ = 0 as every EMMET preset (EasyEdit
    ``hparams/EMMET/*.yaml``, scalable-model-editing/unified-model-editing
    ``hparams/EMMET/*.json``); λ = 100,000 (EasyEdit ``llama3.2-3b.yaml``) scaled to
    the MLP width like MEMIT's (13,953 on SmolLM2, PEERS.md's "λ-scaled" row: ES 0.98
    where 100,000 reaches 0.58). Only δλ/(kᵀC⁻¹k) matters: C'⁻¹ = C⁻¹/λ, so λ sets how
    hard δ relaxes the equality. Layers: see :data:`_MEASURED_LAYERS` and
    ``docs/editing.md``.
    """

    method: Literal["emmet"] = "emmet"
    mom2_update_weight: float = Field(13953.5, gt=0, description="λ in C' = λC + ρI")
    emmet_lambda: float = Field(0.1, ge=0, description="δ in (KᵀC'⁻¹K + δI)⁻¹")
    update_norm_lambda: float = Field(0.0, ge=0, description="ρ in C' = λC + ρI")

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(
            layers=emmet_layers(model_type, num_layers),
            v_loss_layer=num_layers - 1,
            mom2_update_weight=scaled_lambda(d_mlp, _REF_EMMET_LAMBDA),
        )


class AlphaEditHParams(_EditHParams):
    """AlphaEdit (Fang et al. 2024): MEMIT's window loop with the update projected
    onto the null space of the preserved keys,

        ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹,

    P = U Uᵀ from the eigenvectors of C with eigenvalue below ``nullspace_threshold``
    and K_p K_pᵀ the keys of earlier AlphaEdit edits (the version's method state).

    Defaults: threshold 2e-2 and α (``l2``) = 10 as EasyEdit's AlphaEdit presets
    (``hparams/AlphaEdit/{llama3-8b,gpt-j-6B}.yaml``; the paper's code uses 1e-2);
    layers as MEMIT's window (the Llama-3-8B preset edits 4–8, MEMIT's LLaMA window).
    The v* knobs stay the shared defaults (see ``docs/editing.md`` for the presets'
    clamp 0.75 / weight decay 0.5, measured).
    """

    method: Literal["alphaedit"] = "alphaedit"
    nullspace_threshold: float = Field(
        2e-2, gt=0, description="eigenvalues of C below this span the editable subspace"
    )
    l2: float = Field(10.0, gt=0, description="α in (P A + αI)⁻¹")

    @model_validator(mode="after")
    def _needs_statistics(self) -> Self:
        if not self.mom2_adjustment:
            raise ValueError("AlphaEdit projects with the layer statistics: mom2_adjustment")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(layers=layer_window(model_type, num_layers), v_loss_layer=num_layers - 1)


# EasyEdit's GRACE presets put the codebook deep in the model: LLaMA-2-7B layer 27 of
# 32 (zjunlp/EasyEdit hparams/GRACE/llama-7b.yaml, also llama3.2-1b.yaml), GPT-J 25 of
# 28 (gpt-j-6b.yaml); PEERS.md ran the LLaMA preset scaled to SmolLM2: layer 25 of 30
_GRACE_DEPTH = 27 / 32


class GraceHParams(MethodHParams):
    """GRACE (Hartvigsen et al. 2023, "Aging with GRACE"): a key-value codebook with
    deferral radii at one layer's MLP output projection; the weights never change.
    Not a locate-then-edit method: no statistics, no v* (``workers/editing/grace.py``).

    Defaults from EasyEdit's LLaMA presets (zjunlp/EasyEdit
    ``hparams/GRACE/llama-7b.yaml``: ``eps: 1.0``, ``edit_lr: 1.0``, ``n_iter: 50``,
    ``eps_expand: coverage``); ``prob_threshold`` (early stop) is ours, as ROME's
    ``v_prob_threshold``.
    """

    method: Literal["grace"] = "grace"
    eps_init: float = Field(1.0, gt=0, description="ε_init: deferral radius of a new entry")
    edit_lr: float = Field(1.0, gt=0, description="Adam step size of the value training")
    n_iter: int = Field(50, ge=1, le=1000, description="value training steps at most")
    prob_threshold: float = Field(
        0.9, gt=0, le=1, description="stop training once the target's mean token prob. reaches this"
    )

    @model_validator(mode="after")
    def _one_layer(self) -> Self:
        if len(self.layers) != 1:
            raise ValueError("GRACE keeps its codebook at exactly one layer")
        return self

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(layers=(grace_layer(num_layers),))


def grace_layer(num_layers: int) -> int:
    """EasyEdit's GRACE depth (27 of 32) scaled to ``num_layers``: 25 of 30."""
    return min(num_layers - 1, max(0, round(_GRACE_DEPTH * num_layers)))


class _FtHParams(MethodHParams):
    """Fine-tuning baselines (FT-L, FT-C): Adam on the MLP output projections of
    ``layers``, minimising the mean per-token NLL of ``" " + target_new`` after the
    prompt, stopping early once every request's target is reached."""

    num_steps: int = Field(100, ge=1, le=1000, description="Adam steps at most")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    stop_prob: float = Field(
        0.9,
        gt=0,
        le=1,
        description="stop once every request's target tokens are each the most likely "
        "and their mean probability (exp of minus the mean NLL) reaches this",
    )


class FtLHParams(_FtHParams):
    """FT-L: unconstrained fine-tuning of one layer's MLP output projection."""

    method: Literal["ft_l"] = "ft_l"

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        return cls(layers=(ft_layer(num_layers),))


class FtCHParams(_FtHParams):
    """FT-C: fine-tuning with the update bounded in L∞ (ROME's constrained FT baseline,
    after Zhu et al. 2020): ‖ΔW‖∞ ≤ ``norm_constraint`` = ε, projected after each step."""

    method: Literal["ft_c"] = "ft_c"
    norm_constraint: float = Field(
        _FT_C_EPSILON, gt=0, description="ε: every entry of ΔW stays within [−ε, ε]"
    )

    @classmethod
    def defaults(cls, model_type: str, num_layers: int, d_mlp: int) -> Self:
        """Layer 0, as all of ROME's constrained presets (layer 0 beat layer 20 on
        SmolLM2: docs/editing.md); ε = 4e-3, twice ROME's value for its smallest model
        (GPT-2 medium): 2e-3 keeps ES 1.00 for single edits on SmolLM2 but reaches
        only 0.75 in a batch of 16, the service's default batch."""
        return cls(layers=(0,), norm_constraint=_FT_C_EPSILON)


# every method's hparams class, in the order of METHODS; adding a method adds its
# class here (and its editor to workers/editing/registry.py)
_CLASSES: tuple[type[MethodHParams], ...] = (
    RomeHParams,
    RomeOriginalHParams,
    MemitHParams,
    EmmetHParams,
    AlphaEditHParams,
    FtLHParams,
    FtCHParams,
    GraceHParams,
)
METHODS = tuple(cls.model_fields["method"].default for cls in _CLASSES)
HPARAMS_CLASSES: dict[str, type[MethodHParams]] = dict(zip(METHODS, _CLASSES, strict=True))
HParams = Annotated[Union[_CLASSES], Field(discriminator="method")]  # noqa: UP007
_ADAPTER: TypeAdapter[MethodHParams] = TypeAdapter(HParams)


class UnknownMethod(ValueError):
    pass


def hparams_class(method: str) -> type[MethodHParams]:
    try:
        return HPARAMS_CLASSES[method]
    except KeyError:
        raise UnknownMethod(f"unknown method {method!r}; known: {list(METHODS)}") from None


# (model_type, num_layers) → (ROME layer, MEMIT layers), measured (docs/editing.md)
_MEASURED_LAYERS: dict[tuple[str, int], tuple[int, tuple[int, ...]]] = {
    ("llama", 30): (4, (3, 4, 5, 6, 7)),  # SmolLM2-135M
}


def causal_layer(model_type: str, num_layers: int) -> int:
    """ROME's layer: ~15 % of the depth (~35 % for GPT-2), never the last layer,
    whose output is the prediction itself."""
    measured = _MEASURED_LAYERS.get((model_type, num_layers))
    if measured is not None:
        return measured[0]
    frac = 0.35 if model_type == "gpt2" else 0.15
    return min(max(0, num_layers - 2), max(0, round(frac * num_layers)))


def layer_window(model_type: str, num_layers: int) -> tuple[int, ...]:
    """MEMIT's window: five layers from the one below ROME's (ending at it for GPT-2,
    as MEMIT's GPT-2 XL 13–17), never the last layer."""
    measured = _MEASURED_LAYERS.get((model_type, num_layers))
    if measured is not None:
        return measured[1]
    highest = max(0, num_layers - 2)
    centre = causal_layer(model_type, num_layers)
    first = centre - 4 if model_type == "gpt2" else centre - 1
    first = max(0, min(first, highest - 4))
    return tuple(range(first, min(highest, first + 4) + 1))


def ft_layer(num_layers: int) -> int:
    """The fine-tuning baselines' layer: 21 of LLaMA-7B's 32 (EasyEdit
    ``hparams/FT/llama-7b.yaml``; ROME's GPT-J FT preset also tunes 21 of 28), scaled
    to the depth: 20 of SmolLM2's 30, the layer PEERS.md measured EasyEdit's FT-L at."""
    return min(num_layers - 1, round(21 / 32 * num_layers))


def emmet_layers(model_type: str, num_layers: int) -> tuple[int, ...]:
    """EMMET's layers: ROME's single layer, as the EMMET presets (GPT-J 5, Llama-2 5,
    GPT-2 XL 17)."""
    return (causal_layer(model_type, num_layers),)


def scaled_lambda(d_mlp: int, reference: float = _REF_LAMBDA) -> float:
    """A λ set for LLaMA-7B's MLP width, scaled to ``d_mlp`` (module docstring)."""
    return round(reference * d_mlp / _REF_D_MLP, 1)


def defaults_for(method: str, model_type: str, num_layers: int, d_mlp: int) -> MethodHParams:
    """Per-architecture defaults of ``method`` (sources in the module docstring)."""
    return hparams_class(method).defaults(model_type, num_layers, d_mlp)


def parse_hparams(data: Mapping[str, Any]) -> MethodHParams:
    """Validate a stored hparams dict (with its ``method`` key)."""
    return _ADAPTER.validate_python(dict(data))


def with_overrides(base: MethodHParams, overrides: Mapping[str, Any] | None) -> MethodHParams:
    """``base`` with user overrides applied and validated. An unknown key fails
    with a ``ValidationError`` whose location is that key (``extra_forbidden``)."""
    if not overrides:
        return base
    if "method" in overrides and overrides["method"] != base.method:
        raise ValueError(f"overrides may not change the method ({base.method!r})")
    return type(base).model_validate({**base.model_dump(), **dict(overrides)})


# -- EasyEdit YAML ------------------------------------------------------------------------

# keys every locate-then-edit preset shares: their key → ours (same meaning)
_EASYEDIT_V_KEYS = {
    key: key
    for key in (
        "layers",
        "fact_token",
        "v_num_grad_steps",
        "v_lr",
        "v_loss_layer",
        "v_weight_decay",
        "clamp_norm_factor",
        "kl_factor",
        "mom2_adjustment",
        "mom2_n_samples",
        "mom2_dataset",
        "context_template_length_params",
    )
}
# their alg_name (lower case) → (our method, their key → ours; None: read and dropped);
# FT and GRACE are read by their own functions below
_EASYEDIT_KEYS: dict[str, tuple[str, dict[str, str | None]]] = {
    # ROME's presets carry MEMIT's λ, which rank-one ROME does not use
    "rome": ("rome", {**_EASYEDIT_V_KEYS, "mom2_update_weight": None}),
    "memit": ("memit", {**_EASYEDIT_V_KEYS, "mom2_update_weight": "mom2_update_weight"}),
    "emmet": (
        "emmet",
        {
            **_EASYEDIT_V_KEYS,
            "mom2_update_weight": "mom2_update_weight",
            "emmet_lambda": "emmet_lambda",
            "update_norm_lambda": "update_norm_lambda",
        },
    ),
    "alphaedit": (
        "alphaedit",
        {
            **_EASYEDIT_V_KEYS,
            # the presets carry MEMIT's λ; AlphaEdit's solve has α (L2) instead
            "mom2_update_weight": None,
            "nullspace_threshold": "nullspace_threshold",
            "l2": "l2",  # their "L2" (keys are compared in lower case)
        },
    ),
}
# keys that describe the model, the machine or paths: settings and profiles own these
_EASYEDIT_IGNORED = {
    "alg_name",
    "model_name",
    "stats_dir",
    "device",
    "model_parallel",
    "fp16",
    "bf16",
    "mom2_dtype",
    "layer_selection",
    "rewrite_module_tmp",
    "layer_module_tmp",
    "mlp_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
    "batch_size",
    "max_length",
    "p_loc",  # AlphaEdit's precomputed projector file: memedit computes P itself
}
# ROME's layer_stats corpora by name (kmeng01/rome rome/layer_stats.py)
_EASYEDIT_DATASETS = {
    "wikipedia": "hf:wikipedia:20200501.en:train",
    "wikitext": "hf:wikitext:wikitext-103-raw-v1:train",
}
# GRACE's mechanics as memedit implements them (workers/editing/grace.py); a preset
# asking for other mechanics is read, and the difference logged
_EASYEDIT_GRACE_MECHANICS = {
    "dist_fn": "euc",
    "val_train": "sgd",
    "reg": "early_stop",
    "replacement": "replace_last",
    "eps_expand": "coverage",
}
_EASYEDIT_GRACE_IGNORED = {"val_init", "val_reg", "num_pert", "dropout"}


class EasyEditImportError(ValueError):
    pass


def hparams_from_easyedit_yaml(path_or_text: str | Path) -> MethodHParams:
    """Read an EasyEdit hparams YAML (a path or the YAML text itself) of ROME, MEMIT,
    EMMET, AlphaEdit, FT or GRACE into our hparams.

    Their keys map one to one onto ours; module templates, model name, device, dtype
    and file locations are ignored (profiles and settings own them); any other key is
    an error naming it. Keys they lack keep our defaults (e.g. ``v_prob_threshold``).
    FT becomes ``ft_l``, or ``ft_c`` when ``norm_constraint`` is a number. GRACE's
    ``inner_params`` gives the layer, ``eps`` the initial radius.
    """
    data = _easyedit_mapping(path_or_text)
    alg = str(data.get("alg_name", "")).lower()
    if alg == "ft":
        method, values = _easyedit_ft(data)
    elif alg == "grace":
        method, values = "grace", _easyedit_grace(data)
    elif alg in _EASYEDIT_KEYS:
        method, keys = _EASYEDIT_KEYS[alg]
        values = {}
        for key, value in data.items():
            k = key.lower()
            if k in _EASYEDIT_IGNORED:
                continue
            if k not in keys:
                raise EasyEditImportError(f"unknown EasyEdit {alg} hyper-parameter {key!r}")
            ours = keys[k]
            if ours is None:
                continue
            if k == "mom2_dataset":
                value = _EASYEDIT_DATASETS.get(str(value), str(value))
            values[ours] = value
    else:
        known = "ROME, MEMIT, EMMET, AlphaEdit, FT, GRACE"
        raise EasyEditImportError(f"alg_name {data.get('alg_name')!r} is not one of {known}")
    log.info("EasyEdit %s hparams read as %s", alg, method)
    try:
        return hparams_class(method).model_validate(values)
    except ValidationError as exc:
        raise EasyEditImportError(f"EasyEdit {alg} hparams do not validate: {exc}") from exc


def _easyedit_mapping(path_or_text: str | Path) -> dict[str, Any]:
    text = str(path_or_text)
    if isinstance(path_or_text, Path) or ("\n" not in text and Path(text).is_file()):
        text = Path(text).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EasyEditImportError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise EasyEditImportError("an EasyEdit hparams file is a YAML mapping")
    return data


def _easyedit_ft(data: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """EasyEdit's FT preset: ``norm_constraint: false`` is FT-L, a number ε is FT-C.
    memedit's FT has neither weight decay nor a KL term: they must be 0."""
    values: dict[str, Any] = {}
    method = "ft_l"
    for key, value in data.items():
        k = key.lower()
        if k in _EASYEDIT_IGNORED:
            continue
        if k in ("layers", "num_steps", "lr"):
            values[k] = value
        elif k == "norm_constraint":
            if value is not False and value is not None:
                method, values["norm_constraint"] = "ft_c", value
        elif k in ("weight_decay", "kl_factor"):
            if value not in (0, 0.0, None):
                raise EasyEditImportError(f"EasyEdit FT {key}={value!r}: memedit's FT has no {k}")
        else:
            raise EasyEditImportError(f"unknown EasyEdit FT hyper-parameter {key!r}")
    return method, values


def _easyedit_grace(data: Mapping[str, Any]) -> dict[str, Any]:
    """EasyEdit's GRACE preset. The layer comes from ``inner_params`` (one tensor,
    e.g. ``model.layers[27].mlp.down_proj.weight``)."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        k = key.lower()
        if k in _EASYEDIT_IGNORED or k in _EASYEDIT_GRACE_IGNORED:
            continue
        if k == "inner_params":
            names = [value] if isinstance(value, str) else list(value or [])
            layers = [re.search(r"[.\[](\d+)[\].]", str(n)) for n in names]
            if len(names) != 1 or layers[0] is None:
                raise EasyEditImportError(
                    f"EasyEdit GRACE inner_params {value!r}: expected one layer's tensor"
                )
            values["layers"] = (int(layers[0].group(1)),)
        elif k == "eps":
            values["eps_init"] = value
        elif k in ("edit_lr", "n_iter"):
            values[k] = value
        elif k in _EASYEDIT_GRACE_MECHANICS:
            if str(value) != _EASYEDIT_GRACE_MECHANICS[k]:
                log.warning(
                    "EasyEdit GRACE %s=%r: memedit's GRACE uses %s",
                    key, value, _EASYEDIT_GRACE_MECHANICS[k],
                )  # fmt: skip
        else:
            raise EasyEditImportError(f"unknown EasyEdit GRACE hyper-parameter {key!r}")
    return values
