"""The suites' names, parameters, data paths and threshold rules (service/suites.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.suites import (
    SUITE_NAMES,
    SUITE_PARAMS,
    breaches,
    check_suite_params,
    resolve_data_path,
)


def test_breaches() -> None:
    thresholds = {"efficacy": {"min": 0.9}, "perplexity": {"max": 50.0}, "nope": {"min": 0}}
    bad, missing = breaches({"efficacy": 0.95, "perplexity": 80.0}, thresholds)
    assert bad == [{"metric": "perplexity", "value": 80.0, "max": 50.0}]
    assert missing == ["nope"]
    bad, _ = breaches({"efficacy": float("nan"), "perplexity": float("inf")}, thresholds)
    assert [b["metric"] for b in bad] == ["efficacy", "perplexity"]
    assert breaches({"efficacy": 0.9}, {"efficacy": {"min": 0.9}}) == ([], [])


def test_data_paths_resolve_inside_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.jsonl").write_text("{}\n")
    (root / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    assert resolve_data_path(root, "sub/a.jsonl") == (root / "sub" / "a.jsonl").resolve()
    assert resolve_data_path(root, str(root / "b.jsonl")) == (root / "b.jsonl").resolve()
    assert resolve_data_path(root, "sub/../c.jsonl") == (root / "c.jsonl").resolve()
    for bad in ("../outside.jsonl", str(tmp_path / "outside.jsonl"), "link.jsonl", "/etc/passwd"):
        with pytest.raises(ValueError, match="data root|outside"):
            resolve_data_path(root, bad)


def test_every_suite_has_a_param_schema() -> None:
    assert set(SUITE_PARAMS) == set(SUITE_NAMES)
    assert check_suite_params("downstream", {}) == {}
    assert check_suite_params("retention", {"limit": 5}) == {"limit": 5}
