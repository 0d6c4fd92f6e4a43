"""The ``edits`` aggregate: a model's edits, listed for the API; for the workers,
the queued edits of the jobs they hold, and each edit's outcome (applied, rejected,
failed, superseded, reverted or restored by a rollback)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import String, cast, func, select, update
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.ledger import history
from service.ledger.history import EditFilter
from service.ledger.paging import Page
from service.ledger.tables import Edit, EditStatus, Version

log = logging.getLogger(__name__)


def list_edits(
    session: Session,
    model_name: str,
    status: EditStatus | str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Edit]:
    """A page of the model's edits by ascending id, optionally of one status
    (:func:`service.ledger.history.list_edits` has every filter).

    Each edit's ``version`` relationship is loaded (its number is the version
    that applied it).
    """
    where = EditFilter(status=None if status is None else _edit_status(status))
    return history.list_edits(session, model_name, where, limit=limit, cursor=cursor)


def _edit_status(status: EditStatus | str) -> EditStatus:
    try:
        return EditStatus(status)
    except ValueError:
        known = ", ".join(s.value for s in EditStatus)
        raise InvalidInput("status", f"unknown status {status!r}; known: {known}") from None


# -- the worker's side -------------------------------------------------------------------


def pending_edits(session: Session, job_ids: Sequence[str]) -> list[Edit]:
    """The queued edits of ``job_ids`` in the order they were accepted (edit id)."""
    if not job_ids:
        return []
    return list(
        session.scalars(
            select(Edit)
            .where(Edit.job_id.in_(list(job_ids)), Edit.status == EditStatus.queued)
            .order_by(Edit.id)
        )
    )


def mark_applied(session: Session, version_id: int, rows: Mapping[int, dict[str, Any]]) -> None:
    """The edits ``rows`` (edit id → metrics row) are applied by version ``version_id``."""
    for edit_id, row in rows.items():
        session.execute(
            update(Edit)
            .where(Edit.id == edit_id)
            .values(status=EditStatus.applied, version_id=version_id, metrics=row, reason=None)
        )


def mark_rejected(
    session: Session, rows: Mapping[int, dict[str, Any]], reason: str | None
) -> dict[str, list[int]]:
    """The edits ``rows`` (edit id → metrics row) are rejected for ``reason``; returns
    their ids by job."""
    by_job: dict[str, list[int]] = {}
    for e in session.scalars(select(Edit).where(Edit.id.in_(list(rows)))):
        e.status = EditStatus.rejected
        e.reason = reason
        e.metrics = rows[int(e.id)]
        by_job.setdefault(e.job_id, []).append(int(e.id))
    return by_job


def add_imported(
    session: Session,
    model_id: int,
    job_id: str,
    version_id: int,
    edits: Sequence[Mapping[str, Any]],
) -> list[int]:
    """The edits an imported patch carries, recorded as applied by the import's
    version (``metrics.imported`` names where they came from); their ids."""
    rows = []
    for i, e in enumerate(edits):
        rows.append(
            Edit(
                model_id=model_id,
                job_id=job_id,
                position=i,
                method=str(e.get("method") or "import"),
                prompt=str(e.get("prompt") or ""),
                subject=str(e.get("subject") or ""),
                target_new=str(e.get("target_new") or ""),
                target_true=None if e.get("target_true") is None else str(e["target_true"]),
                paraphrase_prompts=[str(p) for p in e.get("paraphrase_prompts") or []],
                neighborhood_prompts=[str(p) for p in e.get("neighborhood_prompts") or []],
                status=EditStatus.applied,
                version_id=version_id,
                metrics={"imported": {"edit_id": e.get("id"), "version": e.get("version")}},
            )
        )
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]


def align_after_rollback(
    session: Session, model_id: int, keep: Collection[int], others: Collection[int], target: int
) -> tuple[list[int], list[int]]:
    """After a rollback to ``target`` an edit is applied iff its version is on the
    target's chain (``keep``; ``others``: every other version number): later edits
    become reverted; edits that an earlier rollback had reverted and that the target's
    chain contains are applied again. Returns (reverted, restored) edit ids."""
    on_chain = select(Version.id).where(
        Version.model_id == model_id, Version.number.in_(list(keep))
    )
    off_chain = select(Version.id).where(
        Version.model_id == model_id, Version.number.in_(list(others))
    )

    def move(old: EditStatus, new: EditStatus, versions: Any, reason: str | None) -> list[int]:
        return list(
            session.scalars(
                update(Edit)
                .where(
                    Edit.model_id == model_id,
                    Edit.status == old,
                    Edit.version_id.in_(versions),
                )
                .values(status=new, reason=reason)
                .returning(Edit.id)
            )
        )

    why = f"rolled back to version {target}"
    reverted = move(EditStatus.applied, EditStatus.reverted, off_chain, why)
    reverted += move(EditStatus.superseded, EditStatus.reverted, off_chain, why)
    restored = move(EditStatus.reverted, EditStatus.applied, on_chain, None)
    restored += _realign_superseded(session, model_id)
    return sorted(reverted), sorted(set(restored))


def _realign_superseded(session: Session, model_id: int) -> list[int]:
    """Of the edits on the head's chain, one is superseded iff the edit that
    superseded it holds (is applied); the ids that became applied."""
    newer = Edit.__table__.alias("newer")
    holds = (
        select(newer.c.id)
        .where(newer.c.id == Edit.superseded_by, newer.c.status == EditStatus.applied)
        .exists()
    )
    back = list(
        session.scalars(
            update(Edit)
            .where(Edit.model_id == model_id, Edit.status == EditStatus.superseded, ~holds)
            .values(status=EditStatus.applied, reason=None)
            .returning(Edit.id)
        )
    )
    session.execute(
        update(Edit)
        .where(Edit.model_id == model_id, Edit.status == EditStatus.applied,
               Edit.superseded_by.is_not(None), holds)
        .values(status=EditStatus.superseded, reason=None)
    )  # fmt: skip
    return back


def active_matches(
    session: Session, model_id: int, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], Edit]:
    """The applied edit of each ``(subject, prompt)`` in ``keys`` that has one: what a
    new request of that subject and prompt supersedes (the newest, should there be
    several: an import can bring a second)."""
    if not keys:
        return {}
    subjects = sorted({subject for subject, _ in keys})
    rows = session.scalars(
        select(Edit)
        .where(Edit.model_id == model_id, Edit.status == EditStatus.applied,
               Edit.subject.in_(subjects))
        .order_by(Edit.id)
    )  # fmt: skip
    return {(e.subject, e.prompt): e for e in rows if (e.subject, e.prompt) in keys}


def mark_superseded(session: Session, pairs: Mapping[int, int]) -> None:
    """Each edit ``old`` of ``pairs`` (new id → old id) is superseded by ``new``."""
    for new, old in pairs.items():
        session.execute(
            update(Edit)
            .where(Edit.id == old)
            .values(status=EditStatus.superseded, superseded_by=new,
                    reason=f"superseded by edit {new}")
        )  # fmt: skip


def chain_edits(
    session: Session, model_id: int, numbers: Collection[int]
) -> list[tuple[Edit, int]]:
    """The edits applied by the versions ``numbers`` with their version number, in the
    order they were applied (version, then acceptance order)."""
    return [
        (e, n)
        for e, n in session.execute(
            select(Edit, Version.number)
            .join(Version, Version.id == Edit.version_id)
            .where(Version.model_id == model_id, Version.number.in_(list(numbers)))
            .order_by(Version.number, Edit.id)
        ).all()
    ]


def chain_active_edits(
    session: Session, model_id: int, numbers: Collection[int]
) -> list[tuple[Edit, int]]:
    """:func:`chain_edits` less those superseded on the same chain (the edit that
    replaced them is among them): the facts the versions ``numbers`` hold, once each."""
    rows = chain_edits(session, model_id, numbers)
    ids = {e.id for e, _ in rows}
    return [(e, n) for e, n in rows if e.superseded_by is None or e.superseded_by not in ids]


def recall_candidates(session: Session, model_id: int, k: int) -> list[Edit]:
    """Up to ``k`` applied edits of the model: those with the smallest md5(id), a
    deterministic, uniform sample of the whole history that is stable as it grows (a
    new edit replaces at most one member). By id."""
    if k <= 0:
        return []
    rows = session.scalars(
        select(Edit)
        .where(Edit.model_id == model_id, Edit.status == EditStatus.applied)
        .order_by(func.md5(cast(Edit.id, String)))
        .limit(k)
    ).all()
    return sorted(rows, key=lambda e: e.id)
