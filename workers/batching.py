"""Sequential-batched editing: which queued edit jobs the writer takes along, and
how the requests it holds are cut into batches (one version each).

Yoon et al. 2024 ("Is Bigger Edit Batch Size Always Better? An Empirical Study on
Model Editing with Llama-3") find that sequences of moderate batches edit better
than single edits or one huge batch. So the model's writer does not apply a stream
of single corrections one version at a time: when it starts an edit job whose
method takes several requests per delta, it claims other queued edit jobs from the
ledger (:func:`claim_jobs`) until it holds the model's ``max_batch`` requests or
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

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, false, func, not_, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from service.models import Edit, EditStatus, Job, JobKind, JobStatus

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


def _compatible(method: str, overrides: Mapping[str, Any]) -> ColumnElement[bool]:
    """Edit jobs the writer may batch with a job of ``method`` and ``overrides``.

    JSONB equality compares the overrides as values (key order does not matter).
    Jobs stored before batching existed have no ``batching`` key: ``auto``.
    """
    payload = type_coerce(Job.payload, JSONB)
    return and_(
        Job.kind == JobKind.edit,
        payload["method"].astext == method,
        payload["hparams"] == type_coerce(dict(overrides), JSONB),
        func.coalesce(payload["batching"].astext, "auto") == "auto",
    )


def claim_jobs(
    s: Session,
    model_id: int,
    method: str,
    overrides: Mapping[str, Any],
    limit: int,
    claimed_by: str,
) -> tuple[list[str], int]:
    """Claim up to ``limit`` queued edit jobs of the model that can be batched with a
    job of ``method``/``overrides``, oldest first, and mark them running.

    Jobs locked by another transaction are skipped (``SKIP LOCKED``); only jobs
    created before the oldest queued job that cannot be batched are taken (see the
    module docstring). Returns the claimed job ids (oldest first) and how many
    queued edits they hold. The caller commits.
    """
    if limit < 1:
        return [], 0
    compatible = _compatible(method, overrides)
    barrier = (
        select(func.min(Job.created_at))
        .where(
            Job.model_id == model_id,
            Job.status == JobStatus.queued,
            Job.kind != JobKind.evaluation,
            not_(func.coalesce(compatible, false())),
        )
        .scalar_subquery()
    )
    ids = list(
        s.scalars(
            select(Job.id)
            .where(
                Job.model_id == model_id,
                Job.status == JobStatus.queued,
                compatible,
                or_(barrier.is_(None), Job.created_at < barrier),
            )
            .order_by(Job.created_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if not ids:
        return [], 0
    s.execute(
        update(Job)
        .where(Job.id.in_(ids))
        .values(
            status=JobStatus.running,
            started_at=func.coalesce(Job.started_at, datetime.now(UTC)),
            message=f"taken into the batches of job {claimed_by}",
        )
    )
    n_edits = s.scalar(
        select(func.count(Edit.id)).where(Edit.job_id.in_(ids), Edit.status == EditStatus.queued)
    )
    return ids, int(n_edits or 0)


def pending_edits(s: Session, job_ids: Sequence[str]) -> list[Edit]:
    """The queued edits of ``job_ids`` in the order they were accepted (edit id)."""
    if not job_ids:
        return []
    return list(
        s.scalars(
            select(Edit)
            .where(Edit.job_id.in_(list(job_ids)), Edit.status == EditStatus.queued)
            .order_by(Edit.id)
        )
    )
