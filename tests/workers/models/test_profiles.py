"""Architecture facts (``workers/models/profiles.py``): the edited projection's layout
and width on every tiny architecture, and the layer rules the hparams defaults read."""

from __future__ import annotations

import pytest

from tests.tiny_models import TINY_KINDS, tiny_model
from workers.models.profiles import GENERAL_RULES, PROFILES, d_mlp, layer_rules, profile_for


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_d_mlp_is_the_key_width_of_the_mlp_output_projection(kind):
    model = tiny_model(kind)
    profile = profile_for(model)
    cfg = model.config
    gpt = kind in ("gpt2", "gptj")
    width = (cfg.n_inner or 4 * cfg.n_embd) if gpt else cfg.intermediate_size
    assert d_mlp(model) == width
    weight = model.get_parameter(profile.mlp_out_param(1))
    # Conv1D stores [d_in, d_out], nn.Linear [d_out, d_in]
    assert tuple(weight.shape) == ((width, 32) if profile.transposed else (32, width))
    assert profile.d_in(weight.shape) == width
    assert profile.transposed == (kind == "gpt2")


def test_layer_rules_by_model_type():
    assert layer_rules("gpt2") is PROFILES["gpt2"].layer_rules
    assert layer_rules("gpt2").causal_layer(48) == 17  # ROME's GPT-2 XL layer
    assert layer_rules("llama").layer_window(30) == (3, 4, 5, 6, 7)  # measured on SmolLM2
    assert layer_rules("mistral").measured == () and layer_rules("llama").measured != ()
    assert layer_rules("no_such_architecture") is GENERAL_RULES
    for rules in {p.layer_rules for p in PROFILES.values()}:
        for n in range(2, 80):
            window = rules.layer_window(n)
            assert window[0] >= 0 and window[-1] <= n - 2 and len(window) == min(5, n - 1)
            assert 0 <= rules.grace_layer(n) < n and 0 <= rules.ft_layer(n) < n
