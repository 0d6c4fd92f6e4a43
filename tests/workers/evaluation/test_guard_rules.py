"""The guard's decision (a pure function of numbers) and GRACE's zero update norm."""

from __future__ import annotations

import math

import pytest
import torch

from service.settings import GuardPolicy, ModelSpec
from tests.tiny_models import TINY_OVERRIDES, tiny_model, word_tokenizer
from workers.editing.hparams import defaults_for, with_overrides
from workers.editing.registry import get_editor
from workers.editing.types import EditContext, EditRequest
from workers.evaluation.canary import CanaryMeasurement
from workers.evaluation.guard_rules import decide, norm_per_request
from workers.runtime import ModelRuntime

POLICY = GuardPolicy()
HEALTHY = CanaryMeasurement(perplexity=20.0, tokens=100)


def canary(ppl: float = 20.0, recall: dict[int, bool] | None = None) -> CanaryMeasurement:
    return CanaryMeasurement(perplexity=ppl, tokens=100, recall=recall or {})


def judge(norm: float, history: list[float], n: int = 1, policy: GuardPolicy = POLICY, **kw):
    return decide(
        update_norm=norm,
        n_requests=n,
        history=history,
        before=kw.get("before", HEALTHY),
        after=kw.get("after", HEALTHY),
        policy=policy,
        exclude=kw.get("exclude", ()),
    )


def test_defaults_are_in_the_model_policy() -> None:
    policy = ModelSpec(source="x").policy()
    assert policy["guard"] == {
        "enabled": True, "norm_factor": 10.0, "norm_min_history": 10, "norm_window": 100,
        "perplexity_ratio": 2.0, "recall_drop": 0.5, "recall_min_edits": 5,
        "canary_texts": 4, "canary_edits": 16,
    }  # fmt: skip
    tuned = ModelSpec.model_validate({"source": "x", "guard": {"norm_factor": 3}})
    assert tuned.guard.norm_factor == 3.0 and tuned.guard.norm_min_history == 10
    with pytest.raises(ValueError):
        ModelSpec.model_validate({"source": "x", "guard": {"norm_factr": 3}})
    with pytest.raises(ValueError):
        GuardPolicy(perplexity_ratio=1.0)


def test_norm_rule_against_the_running_median() -> None:
    history = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 100.0]  # median 5.5
    ok = judge(54.0, history)
    assert ok.accepted and ok.reason is None and ok.rules == ()
    assert ok.numbers["norm_median"] == 5.5 and ok.numbers["norm_ratio"] == pytest.approx(54 / 5.5)
    bad = judge(56.0, history)
    assert not bad.accepted and bad.rules == ("norm",)
    assert "10.2×" in bad.reason and "running median 5.5" in bad.reason
    # the perplexity and recall numbers are reported even when the norm decides
    assert bad.numbers["perplexity_ratio"] == 1.0 and bad.numbers["recall_rule"].startswith(
        "skipped"
    )
    assert bad.to_json()["accepted"] is False and bad.to_json()["policy"]["norm_factor"] == 10


def test_norm_rule_waits_for_history_and_uses_a_window() -> None:
    short = judge(1e6, [1.0] * 9)
    assert short.accepted and short.numbers["norm_rule"].startswith("skipped: 9 accepted")
    assert short.numbers["norm_median"] is None
    # only the latest norm_window norms count: old small norms drop out
    policy = GuardPolicy(norm_window=10)
    history = [0.1] * 50 + [10.0] * 10
    assert judge(50.0, history, policy=policy).accepted
    assert not judge(50.0, history, policy=GuardPolicy(norm_window=100)).accepted
    # policy knobs
    assert not judge(4.0, [1.0] * 3, policy=GuardPolicy(norm_min_history=3, norm_factor=3)).accepted


def test_norm_per_request_scales_a_batch_by_its_square_root() -> None:
    assert norm_per_request(8.0, 4) == 4.0
    history = [1.0] * 20
    # a batch of 16 with norm 36 is 9 per request: accepted; one request with 36: rejected
    assert judge(36.0, history, n=16).accepted
    assert not judge(36.0, history, n=1).accepted
    with pytest.raises(ValueError):
        norm_per_request(1.0, 0)


def test_a_method_without_weight_updates_skips_the_norm_rule_not_the_canary() -> None:
    history = [1.0] * 20
    grace = judge(0.0, history)
    assert grace.accepted and grace.numbers["norm_rule"] == "skipped: the update changes no weights"
    collapsed = judge(0.0, history, after=canary(ppl=45.0))
    assert not collapsed.accepted and collapsed.rules == ("perplexity",)


def test_perplexity_rule() -> None:
    assert judge(1.0, [], after=canary(ppl=39.9)).accepted
    bad = judge(1.0, [], after=canary(ppl=40.1))
    assert bad.rules == ("perplexity",) and "from 20 to 40.1" in bad.reason
    for broken in (math.inf, math.nan):
        d = judge(1.0, [], after=canary(ppl=broken))
        assert not d.accepted and d.numbers["perplexity_ratio"] == math.inf
    assert judge(1.0, [], after=canary(ppl=29.0), policy=GuardPolicy(perplexity_ratio=1.4)).rules


def test_recall_rule() -> None:
    before = canary(recall={k: True for k in range(10)} | {10: False, 11: False})
    # 5 of the 10 recalled lost: 50 % is not above the limit
    half = canary(recall={k: k >= 5 for k in range(12)})
    ok = judge(1.0, [], before=before, after=half)
    assert ok.accepted and ok.numbers["recall_lost"] == [0, 1, 2, 3, 4]
    assert ok.numbers["recall_before"] == pytest.approx(10 / 12)
    six = canary(recall={k: k >= 6 for k in range(12)})
    bad = judge(1.0, [], before=before, after=six)
    assert bad.rules == ("recall",) and "lose 6 of 10" in bad.reason
    # edits about the update's own subjects are left out
    assert judge(1.0, [], before=before, after=six, exclude={0, 1}).accepted
    # too few recalled edits: the rule waits
    few = judge(1.0, [], before=canary(recall={1: True, 2: True}), after=canary(recall={}))
    assert few.accepted and few.numbers["recall_rule"].startswith("skipped: 0 sampled")
    several = judge(
        1.0,
        [1.0] * 20,
        before=before,
        after=canary(ppl=100.0, recall={k: False for k in range(12)}),
    )
    assert several.rules == ("perplexity", "recall")
    assert several.reason.count(";") == 1


def test_grace_changes_no_weights_so_its_staged_norm_is_zero() -> None:
    torch.set_num_threads(1)
    model, tok = tiny_model("llama", seed=0), word_tokenizer()
    rt = ModelRuntime(model)
    cfg = model.config
    hp = with_overrides(
        defaults_for("grace", cfg.model_type, cfg.num_hidden_layers, 64), TINY_OVERRIDES["grace"]
    )
    req = EditRequest("The native language of {}", "Picasso", "Russian", "Spanish")
    delta = get_editor("grace").compute_delta(
        model, tok, [req], hp, EditContext(state=rt.method_state())
    )
    assert delta.updates == [] and delta.modules
    staged = rt.stage(delta)
    try:
        assert staged.update_norm == 0.0
        assert judge(staged.update_norm, [1.0] * 20).numbers["norm_rule"].startswith("skipped")
    finally:
        rt.discard(staged)
