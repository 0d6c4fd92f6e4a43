"""EasyEdit's hparams YAML (zjunlp/EasyEdit ``hparams/<METHOD>/*.yaml``) read into ours:
ROME, MEMIT, EMMET, AlphaEdit, FT and GRACE presets (``docs/editing.md``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from workers.editing.hparams.base import MethodHParams
from workers.editing.hparams.methods import hparams_class

log = logging.getLogger(__name__)

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
