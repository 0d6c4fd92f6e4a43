"""Sequential-batched editing: which queued edit jobs the writer takes along, and
how the requests it holds are cut into batches (one version each).

Yoon et al. 2024 ("Is Bigger Edit Batch Size Always Better? An Empirical Study on
Model Editing with Llama-3") find that sequences of moderate batches edit better
than single edits or one huge batch. So the model's writer does not apply a stream
of single corrections one version at a time: when it starts an edit job whose
method takes several requests per delta, it claims other queued edit jobs from the
ledger (:func:`service.ledger.jobs.claim_batchable`) until it holds the model's ``max_batch`` requests or
``max_wait_ms`` passed, then applies them as sequential batches
(:func:`next_batch`), one version each.

Rules (docs/api.md, "Batching"):

- Only jobs with the same method and the same hparams overrides, asking for
  ``"batching": "auto"``, are taken along, oldest first, with
  ``SELECT … FOR UPDATE SKIP LOCKED`` so that two writers never claim the same job.
- The writer never reorders jobs: a queued job it cannot take along (a rollback, an
  edit with another method or other hparams, an ``alone`` edit) is a barrier, and
  only jobs queued before it are claimed. Evaluation jobs are no barrier: each one
  names the version it measures, whatever is applied before it runs.
- Requests about the same subject (compared case-insensitively, whitespace
  collapsed) never share a batch: MEMIT-style solves give them the same key with
  different values. The later one goes to a following batch, so it is applied
  after the earlier one and wins, as it would unbatched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def subject_key(subject: str) -> str:
    """A subject as the same-subject rule compares it: case-folded, whitespace collapsed."""
    return " ".join(subject.split()).casefold()


def next_batch(items: Sequence[T], max_size: int, subject: Callable[[T], str]) -> list[T]:
    """The first batch of ``items`` (in application order): at most ``max_size`` of
    them, in order, skipping any whose subject is already in the batch.

    A skipped item keeps its place for the next call on the items left, so requests
    about one subject are applied in their order, one batch after another.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    batch: list[T] = []
    seen: set[str] = set()
    for item in items:
        if len(batch) == max_size:
            break
        key = subject_key(subject(item))
        if key in seen:
            continue
        seen.add(key)
        batch.append(item)
    return batch


def plan_batches(items: Sequence[T], max_size: int, subject: Callable[[T], str]) -> list[list[T]]:
    """Every batch :func:`next_batch` would make, one after the other."""
    left = list(items)
    batches: list[list[T]] = []
    while left:
        batch = next_batch(left, max_size, subject)
        taken = {id(x) for x in batch}
        left = [x for x in left if id(x) not in taken]
        batches.append(batch)
    return batches


def batch_size(editor: Any, max_batch: int) -> int:
    """The most requests one version applies: the model's ``max_batch``, capped by the
    editor's ``max_requests_per_delta`` (ROME: 1)."""
    per_delta = editor.max_requests_per_delta
    return max(1, min(max_batch, per_delta)) if per_delta else max(1, max_batch)
