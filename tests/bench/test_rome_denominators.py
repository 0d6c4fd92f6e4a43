"""bench/rome_denominators.py on a tiny random LLaMA: the blow-up it computes from the
keys alone is the ratio of the original ROME update to r-ROME's, as the editors
compute them; and the sequence it writes for the catch-rate run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rome_denominators import blow_ups, sequence, summary
from tests.bench.test_sequential import RECORDS, _request
from tests.tiny_models import tiny_ctx, tiny_hparams, tiny_model, word_tokenizer
from workers.editing import registry
from workers.editing.hparams import with_overrides
from workers.models.profiles import profile_for


def test_blow_up_is_the_ratio_of_the_two_rome_updates(tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    hp = {}
    deltas = {}
    for method in ("rome", "rome_original"):
        hp[method] = with_overrides(
            tiny_hparams(method, model), {"context_template_length_params": [[5, 3]]}
        )
        ctx = tiny_ctx(model, tok, hp[method], tmp_path)
        deltas[method] = [
            registry.get_editor(method).compute_delta(model, tok, [_request(r)], hp[method], ctx)
            for r in RECORDS[:3]
        ]
    ctx = tiny_ctx(model, tok, hp["rome_original"], tmp_path)  # the prefixes are seeded
    rows = blow_ups(model, tok, RECORDS[:3], hp["rome_original"], ctx, chunk=2)
    param = profile_for(model).mlp_out_param(hp["rome"].layers[0])
    for row, orig, rome in zip(rows, deltas["rome_original"], deltas["rome"], strict=True):
        assert row["bare_denominator"] == pytest.approx(orig.meta["denominator"], rel=1e-5)
        assert row["averaged_denominator"] == pytest.approx(
            orig.meta["averaged_key_denominator"], rel=1e-5
        )
        ratio = float(orig.dense()[param].norm() / rome.dense()[param].norm())
        assert abs(row["blow_up"]) == pytest.approx(ratio, rel=1e-4)
        assert abs(row["blow_up"] - 1.0) > 1e-3  # the prefixes move the key
    s = summary(rows)
    assert s["records"] == 3 and s["max"] == max(abs(r["blow_up"]) for r in rows)


def test_sequence_puts_ordinary_records_before_each_candidate() -> None:
    rows = [{"case_id": i, "blow_up": b} for i, b in
            enumerate([1.0, 40.0, 1.1, -0.9, 12.0, 3.0, 1.2, 1.5, -25.0])]  # fmt: skip
    assert sequence(rows, 10.0, 2) == [0, 2, 1, 3, 6, 4, 7, 8]
    assert sequence(rows, 10.0, 0) == [1, 4, 8]
