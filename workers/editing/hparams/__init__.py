"""Hyper-parameters of the editing methods: validated per-edit data, stored in the ledger.

One module per method beside its editor (``rome``, ``memit``, ``emmet``,
``alphaedit``, ``grace``, ``ft``) over :mod:`.base`; :mod:`.methods` keys them by
method id, :mod:`.easyedit` reads EasyEdit's YAML presets. This package imports no
torch: the API process validates user overrides with it. Device, dtype and file
locations are settings, never hyper-parameters; layer paths and the per-architecture
layer rules come from ``workers/models/profiles.py``.

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
  around it (GPT-J 3–8, LLaMA-7B 4–8, GPT-2 XL 13–17); GRACE's and FT's layers are
  fractions of the depth. The rules are architecture facts: ``LayerRules`` in
  ``workers/models/profiles.py``. Measured on SmolLM2 (30 layers): the llama
  profile's ``LayerRules.measured``.
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

from workers.editing.hparams.alphaedit import AlphaEditHParams
from workers.editing.hparams.base import LocateEditHParams, MethodHParams, scaled_lambda
from workers.editing.hparams.easyedit import EasyEditImportError, hparams_from_easyedit_yaml
from workers.editing.hparams.emmet import EmmetHParams
from workers.editing.hparams.ft import FtCHParams, FtLHParams
from workers.editing.hparams.grace import GraceHParams
from workers.editing.hparams.memit import MemitHParams
from workers.editing.hparams.methods import (
    HPARAMS_CLASSES,
    METHODS,
    HParams,
    UnknownMethod,
    defaults_for,
    hparams_class,
    parse_hparams,
    with_overrides,
)
from workers.editing.hparams.rome import RomeHParams, RomeOriginalHParams

__all__ = [
    "HPARAMS_CLASSES",
    "METHODS",
    "AlphaEditHParams",
    "EasyEditImportError",
    "EmmetHParams",
    "FtCHParams",
    "FtLHParams",
    "GraceHParams",
    "HParams",
    "LocateEditHParams",
    "MemitHParams",
    "MethodHParams",
    "RomeHParams",
    "RomeOriginalHParams",
    "UnknownMethod",
    "defaults_for",
    "hparams_class",
    "hparams_from_easyedit_yaml",
    "parse_hparams",
    "scaled_lambda",
    "with_overrides",
]
