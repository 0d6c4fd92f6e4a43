"""The editing methods' hyper-parameters (``workers/editing/hparams``): per-architecture
defaults, overrides, stored dicts and EasyEdit's YAML presets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.editing.hparams import (
    AlphaEditHParams,
    EasyEditImportError,
    EmmetHParams,
    FtCHParams,
    FtLHParams,
    GraceHParams,
    MemitHParams,
    RomeHParams,
    defaults_for,
    hparams_from_easyedit_yaml,
    parse_hparams,
    with_overrides,
)


def test_defaults_per_architecture():
    rome = defaults_for("rome", "llama", 30, 1536)
    memit = defaults_for("memit", "llama", 30, 1536)
    assert isinstance(rome, RomeHParams) and isinstance(memit, MemitHParams)
    assert rome.layers == (4,) and memit.layers == (3, 4, 5, 6, 7)
    assert rome.v_loss_layer == memit.v_loss_layer == 29
    assert memit.mom2_update_weight == pytest.approx(2093.0, abs=0.1)  # 15,000 · 1536/11008
    gpt2 = defaults_for("rome", "gpt2", 48, 6400)
    assert gpt2.layers == (17,)  # ROME's GPT-2 XL layer
    assert defaults_for("memit", "gptj", 28, 16384).layers == (3, 4, 5, 6, 7)
    assert defaults_for("memit", "gpt2", 48, 6400).layers == (13, 14, 15, 16, 17)
    assert defaults_for("memit", "llama", 32, 11008).layers == (4, 5, 6, 7, 8)
    assert defaults_for("memit", "llama", 4, 64).layers[-1] <= 2  # never the last layer
    grace = defaults_for("grace", "llama", 30, 1536)
    assert isinstance(grace, GraceHParams)
    assert grace.layers == (25,)  # EasyEdit's LLaMA preset (27 of 32) as PEERS.md ran it
    assert (grace.eps_init, grace.edit_lr, grace.n_iter) == (1.0, 1.0, 50)
    assert defaults_for("grace", "llama", 32, 11008).layers == (27,)
    assert defaults_for("grace", "gpt2", 4, 128).layers == (3,)
    assert not hasattr(grace, "mom2_dataset")  # no statistics: the worker computes none
    with pytest.raises(ValidationError, match="exactly one layer"):
        with_overrides(grace, {"layers": [20, 25]})
    with pytest.raises(ValueError, match="unknown method"):
        defaults_for("grace-ful", "llama", 30, 1536)


def test_overrides_validate_and_name_bad_keys():
    base = defaults_for("memit", "llama", 30, 1536)
    hp = with_overrides(base, {"v_lr": 0.1, "layers": [5, 6]})
    assert hp.v_lr == 0.1 and hp.layers == (5, 6) and hp.kl_factor == base.kl_factor
    with pytest.raises(ValidationError) as err:
        with_overrides(base, {"v_lr": 0.1, "learning_rate": 3})
    assert [e["loc"] for e in err.value.errors()] == [("learning_rate",)]
    assert "learning_rate" in str(err.value)
    with pytest.raises(ValidationError, match="v_num_grad_steps"):
        with_overrides(base, {"v_num_grad_steps": 0})
    with pytest.raises(ValidationError, match="exactly one layer"):
        with_overrides(defaults_for("rome", "llama", 30, 1536), {"layers": [3, 4]})
    with pytest.raises(ValueError, match="may not change the method"):
        with_overrides(base, {"method": "rome"})
    stored = parse_hparams(hp.model_dump(mode="json"))
    assert stored == hp


EASYEDIT_MEMIT_YAML = """\
alg_name: "MEMIT"
model_name: "./hugging_cache/smollm2-135m"
stats_dir: "./data/stats"
device: 0
layers: [3, 4, 5, 6, 7]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 29
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 2093
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 1000
mom2_dtype: "float32"
"""


def test_easyedit_yaml_import(tmp_path):
    path = tmp_path / "memit-smollm2.yaml"
    path.write_text(EASYEDIT_MEMIT_YAML)
    for source in (path, str(path), EASYEDIT_MEMIT_YAML):
        hp = hparams_from_easyedit_yaml(source)
        assert isinstance(hp, MemitHParams)
        assert hp.layers == (3, 4, 5, 6, 7)
        assert hp.v_loss_layer == 29 and hp.v_lr == 0.5 and hp.mom2_update_weight == 2093
        assert hp.mom2_n_samples == 1000
        assert hp.mom2_dataset == "hf:wikipedia:20200501.en:train"
    rome = hparams_from_easyedit_yaml(
        EASYEDIT_MEMIT_YAML.replace('"MEMIT"', '"ROME"').replace("[3, 4, 5, 6, 7]", "[4]")
    )
    assert isinstance(rome, RomeHParams) and rome.layers == (4,)
    with pytest.raises(EasyEditImportError, match="'v_lr_typo'"):
        hparams_from_easyedit_yaml(EASYEDIT_MEMIT_YAML + "v_lr_typo: 1\n")
    with pytest.raises(EasyEditImportError, match="alg_name"):
        hparams_from_easyedit_yaml(EASYEDIT_MEMIT_YAML.replace('"MEMIT"', '"KN"'))
    with pytest.raises(EasyEditImportError, match="do not validate"):
        hparams_from_easyedit_yaml(EASYEDIT_MEMIT_YAML.replace("25\n", "-1\n", 1))


def _without(yaml_text: str, *keys: str) -> str:
    return "".join(line + "\n" for line in yaml_text.splitlines() if line.split(":")[0] not in keys)


def test_easyedit_yaml_import_of_emmet_and_alphaedit():
    emmet = hparams_from_easyedit_yaml(
        _without(EASYEDIT_MEMIT_YAML, "layers").replace('"MEMIT"', '"EMMET"')
        + "layers: [4]\nupdate_norm_lambda: 0\nemmet_lambda: 0.1\n"
    )
    assert isinstance(emmet, EmmetHParams)
    assert emmet.layers == (4,) and emmet.emmet_lambda == 0.1 and emmet.update_norm_lambda == 0
    assert emmet.mom2_update_weight == 2093
    alpha = hparams_from_easyedit_yaml(
        EASYEDIT_MEMIT_YAML.replace('"MEMIT"', '"AlphaEdit"')
        + 'P_loc: "./null_space_project.pt"\nnullspace_threshold: 3e-2\nL2: 12\n'
    )
    assert isinstance(alpha, AlphaEditHParams)
    assert alpha.nullspace_threshold == 0.03 and alpha.l2 == 12 and alpha.layers == (3, 4, 5, 6, 7)
    with pytest.raises(EasyEditImportError, match="'emmet_lambda'"):
        hparams_from_easyedit_yaml(EASYEDIT_MEMIT_YAML + "emmet_lambda: 0.1\n")


EASYEDIT_FT_YAML = """\
alg_name: "FT"
model_name: "./hugging_cache/smollm2-135m"
device: 0
layers: [20]
num_steps: 40
batch_size: 1
max_length: 30
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: false
rewrite_module_tmp: "model.layers.{}.mlp.down_proj.weight"
"""


def test_easyedit_yaml_import_of_ft():
    ft_l = hparams_from_easyedit_yaml(EASYEDIT_FT_YAML)
    assert isinstance(ft_l, FtLHParams) and ft_l.layers == (20,) and ft_l.num_steps == 40
    ft_c = hparams_from_easyedit_yaml(
        EASYEDIT_FT_YAML.replace("norm_constraint: false", "norm_constraint: 5e-4")
    )
    assert isinstance(ft_c, FtCHParams) and ft_c.norm_constraint == 5e-4 and ft_c.lr == 5e-4
    with pytest.raises(EasyEditImportError, match="weight_decay"):
        hparams_from_easyedit_yaml(EASYEDIT_FT_YAML.replace("weight_decay: 0", "weight_decay: 1"))


EASYEDIT_GRACE_YAML = """\
alg_name: "GRACE"
model_name: "./hugging_cache/smollm2-135m"
device: 0
inner_params:
- model.layers[25].mlp.down_proj.weight
edit_lr: 0.5
n_iter: 30
eps: 2.0
dist_fn: euc
val_init: cold
val_train: sgd
val_reg: None
reg: early_stop
replacement: replace_last
eps_expand: coverage
num_pert: 8
dropout: 0.0
"""


def test_easyedit_yaml_import_of_grace():
    grace = hparams_from_easyedit_yaml(EASYEDIT_GRACE_YAML)
    assert isinstance(grace, GraceHParams)
    assert grace.layers == (25,) and grace.eps_init == 2.0
    assert grace.edit_lr == 0.5 and grace.n_iter == 30
    two = EASYEDIT_GRACE_YAML.replace(
        "- model.layers[25]", "- model.layers[24].mlp.down_proj.weight\n- model.layers[25]"
    )
    with pytest.raises(EasyEditImportError, match="one layer"):
        hparams_from_easyedit_yaml(two)
    with pytest.raises(EasyEditImportError, match="'radius'"):
        hparams_from_easyedit_yaml(EASYEDIT_GRACE_YAML + "radius: 1\n")
