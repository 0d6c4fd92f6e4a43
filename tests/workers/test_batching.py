"""The batching rules (workers/batching.py): how held requests are cut into batches
(which queued jobs a writer claims is tests/service/ledger/test_jobs.py)."""

from __future__ import annotations

import pytest

from workers.batching import batch_size, next_batch, plan_batches
from workers.batching import subject_key as key
from workers.editing.memit import MemitEditor
from workers.editing.rome import RomeEditor


def subjects(batches: list[list[tuple[int, str]]]) -> list[list[int]]:
    return [[i for i, _ in b] for b in batches]


def test_subject_key_ignores_case_and_whitespace() -> None:
    assert key("  The Eiffel\tTower ") == key("the eiffel tower") == "the eiffel tower"
    assert key("Eiffel Tower") != key("The Eiffel Tower")


def test_batches_respect_the_size_and_keep_order() -> None:
    items = [(i, f"s{i}") for i in range(10)]
    assert subjects(plan_batches(items, 4, lambda x: x[1])) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert subjects(plan_batches(items, 1, lambda x: x[1])) == [[i] for i in range(10)]
    with pytest.raises(ValueError, match="max_size"):
        next_batch(items, 0, lambda x: x[1])


def test_same_subject_goes_to_a_following_batch_in_order() -> None:
    items = [(0, "Mozart"), (1, "mozart "), (2, "Curie"), (3, "MOZART"), (4, "Newton"), (5, "Ada")]
    # later requests about a subject already in the batch wait for the next one, so
    # they are applied after the earlier ones (and win); the others fill the batch
    assert subjects(plan_batches(items, 3, lambda x: x[1])) == [[0, 2, 4], [1, 5], [3]]
    assert subjects(plan_batches(items, 16, lambda x: x[1])) == [[0, 2, 4, 5], [1], [3]]


def test_batch_size_is_capped_by_the_editor() -> None:
    assert batch_size(MemitEditor(), 16) == 16
    assert batch_size(RomeEditor(), 16) == 1
    assert batch_size(MemitEditor(), 1) == 1
