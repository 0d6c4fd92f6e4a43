"""Ledger operations against the real PostgreSQL ledger."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import ledger
from service.errors import InvalidInput, NotFound
from service.ledger.tables import (
    Edit,
    EditStatus,
    Job,
    JobKind,
    JobStatus,
    Model,
    Version,
    VersionKind,
)
from service.settings import GuardPolicy, Settings

from .conftest import MODEL, OTHER, edit_request


@pytest.fixture
def synced(session: Session, api_settings: Settings) -> Session:
    ledger.sync_models(session, api_settings)
    session.commit()
    return session


def _count(session: Session, table: type) -> int:
    return session.scalar(select(func.count()).select_from(table))


def add_versions(session: Session, model_name: str, n: int) -> None:
    """Versions 0..n-1 as a worker writes them (it fills in the base version that
    :func:`ledger.sync_models` wrote, if there is one)."""
    model = ledger.get_model(session, model_name)
    base = session.scalar(select(Version).where(Version.model_id == model.id, Version.number == 0))
    if base is not None:
        base.tensor_sha256 = {"w": f"{0:064x}"}
    for number in range(1 if base is not None else 0, n):
        session.add(
            Version(
                model_id=model.id,
                number=number,
                kind=VersionKind.base if number == 0 else VersionKind.edit,
                parent_number=None if number == 0 else number - 1,
                method=None if number == 0 else "rome",
                tensor_sha256={"w": f"{number:064x}"},
                drift={} if number == 0 else {"model.layers.4.mlp.down_proj.weight": 0.01 * number},
                update_norm=None if number == 0 else float(number),
                timing={} if number == 0 else {"compute_s": 1.5},
            )
        )
    session.commit()


def test_sync_models_inserts_missing_names_once(session: Session, api_settings: Settings) -> None:
    assert ledger.sync_models(session, api_settings) == [MODEL, OTHER]
    session.commit()
    assert ledger.sync_models(session, api_settings) == []
    session.commit()
    rows = {m.name: m for m in session.scalars(select(Model))}
    assert set(rows) == {MODEL, OTHER}
    assert rows[OTHER].source == "sshleifer/tiny-gpt2"
    assert rows[OTHER].architecture is None
    assert rows[OTHER].policy == {
        "snapshot_every": 3,
        "max_batch": 4,
        "max_wait_ms": 50,
        "guard": GuardPolicy().model_dump(),
        "evaluations": [],
    }


def test_create_edit_job_stores_job_and_ordered_edits(synced: Session) -> None:
    requests = [edit_request(), edit_request(subject="Big Ben", target_new="Paris")]
    job = ledger.create_edit_job(synced, MODEL, "memit", {"v_lr": 0.1}, requests, max_requests=3)
    synced.commit()
    stored = synced.get(Job, job.id)
    assert stored is not None
    assert (stored.kind, stored.status, stored.progress) == (JobKind.edit, JobStatus.queued, 0.0)
    assert stored.payload == {"method": "memit", "hparams": {"v_lr": 0.1}, "batching": "auto"}
    edits = synced.scalars(select(Edit).where(Edit.job_id == job.id).order_by(Edit.id)).all()
    assert [e.position for e in edits] == [0, 1]
    assert [e.subject for e in edits] == ["The Eiffel Tower", "Big Ben"]
    assert {e.status for e in edits} == {EditStatus.queued}
    assert {e.method for e in edits} == {"memit"}
    assert edits[0].paraphrase_prompts == ["The Eiffel Tower stands in the city of"]
    assert [e.id for e in job.edits] == [e.id for e in edits]


@pytest.mark.parametrize(
    ("method", "hparams", "requests", "field"),
    [
        ("sgd", None, [edit_request()], "method"),
        ("rome", {"no_such_knob": 1}, [edit_request()], "hparams.no_such_knob"),
        ("rome", {"v_lr": "fast"}, [edit_request()], "hparams.v_lr"),
        ("rome", {"layers": [3, 4]}, [edit_request()], "hparams.layers"),
        ("rome", None, [], "requests"),
        ("rome", None, [edit_request()] * 4, "requests"),
        ("rome", None, [edit_request(), edit_request(prompt="no slot")], "requests.1.prompt"),
        ("rome", None, [edit_request(subject="")], "requests.0.subject"),
    ],
)
def test_create_edit_job_rejects_bad_input_and_stores_nothing(
    synced: Session, method: str, hparams: dict | None, requests: list, field: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.create_edit_job(synced, MODEL, method, hparams, requests, max_requests=3)
    assert err.value.field == field
    synced.rollback()
    assert _count(synced, Job) == 0
    assert _count(synced, Edit) == 0


def test_unknown_batching_mode_is_invalid_and_stores_nothing(synced: Session) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.create_edit_job(synced, MODEL, "memit", None, [edit_request()], batching="later")
    assert err.value.field == "batching"
    synced.rollback()
    assert _count(synced, Job) == 0


def test_unknown_model_is_not_found(synced: Session) -> None:
    with pytest.raises(NotFound) as err:
        ledger.create_edit_job(synced, "nope", "rome", None, [edit_request()])
    assert err.value.field == "model"
    with pytest.raises(NotFound):
        ledger.create_rollback_job(synced, "nope", 0)
    with pytest.raises(NotFound):
        ledger.list_edits(synced, "nope")


def test_rollback_needs_an_existing_version(synced: Session) -> None:
    # before any worker loaded the model, its base version exists: a rollback to it
    # is accepted (and waits in the queue), one to any other version is not
    with pytest.raises(InvalidInput) as err:
        ledger.create_rollback_job(synced, MODEL, 1)
    assert err.value.field == "to_version"
    assert "its versions are 0..0" in err.value.message
    assert ledger.create_rollback_job(synced, MODEL, 0).payload == {"to_version": 0}
    synced.rollback()
    add_versions(synced, MODEL, 3)
    with pytest.raises(InvalidInput) as err:
        ledger.create_rollback_job(synced, MODEL, 3)
    assert err.value.field == "to_version"
    assert "0..2" in err.value.message
    synced.rollback()
    job = ledger.create_rollback_job(synced, MODEL, 1)
    synced.commit()
    assert (job.kind, job.payload) == (JobKind.rollback, {"to_version": 1})
    assert _count(synced, Job) == 1


def test_rollback_checks_the_version_of_the_right_model(synced: Session) -> None:
    add_versions(synced, OTHER, 5)
    add_versions(synced, MODEL, 1)
    with pytest.raises(InvalidInput):
        ledger.create_rollback_job(synced, MODEL, 4)


def test_get_job(synced: Session) -> None:
    job = ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    synced.commit()
    found = ledger.get_job(synced, job.id)
    assert (found.id, found.model.name) == (job.id, OTHER)
    for bad in (str(uuid.uuid4()), "not-a-uuid", "", "1; DROP TABLE jobs"):
        with pytest.raises(NotFound) as err:
            ledger.get_job(synced, bad)
        assert err.value.field == "job_id"


def test_head_version_number(synced: Session) -> None:
    model = ledger.get_model(synced, MODEL)
    assert ledger.head_version_number(synced, model.id) == 0  # the base, from the start
    add_versions(synced, MODEL, 4)
    assert ledger.head_version_number(synced, model.id) == 3
    assert dict((m.name, h) for m, h in ledger.list_models(synced)) == {MODEL: 3, OTHER: 0}


def test_list_edits_keyset_pages_cover_everything_once(synced: Session) -> None:
    ids = []
    for i in range(7):
        job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request(subject=f"S{i}")])
        ids.extend(e.id for e in job.edits)
    ledger.create_edit_job(synced, OTHER, "rome", None, [edit_request()])
    synced.commit()
    seen, cursor, pages = [], None, 0
    while True:
        page = ledger.list_edits(synced, MODEL, limit=3, cursor=cursor)
        seen.extend(e.id for e in page.items)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3


def test_list_edits_filters_by_status(synced: Session) -> None:
    job = ledger.create_edit_job(
        synced, MODEL, "rome", None, [edit_request(), edit_request(subject="Big Ben")]
    )
    job.edits[1].status = EditStatus.failed
    job.edits[1].reason = "boom"
    synced.commit()
    failed = ledger.list_edits(synced, MODEL, status="failed")
    assert [e.subject for e in failed.items] == ["Big Ben"]
    assert [e.subject for e in ledger.list_edits(synced, MODEL, status="queued").items] == [
        "The Eiffel Tower"
    ]
    with pytest.raises(InvalidInput) as err:
        ledger.list_edits(synced, MODEL, status="lost")
    assert err.value.field == "status"


def test_list_versions_pages_ascending(synced: Session) -> None:
    add_versions(synced, MODEL, 5)
    first = ledger.list_versions(synced, MODEL, limit=2)
    assert [v.number for v in first.items] == [0, 1]
    second = ledger.list_versions(synced, MODEL, limit=2, cursor=first.next_cursor)
    third = ledger.list_versions(synced, MODEL, limit=2, cursor=second.next_cursor)
    assert [v.number for v in second.items + third.items] == [2, 3, 4]
    assert third.next_cursor is None


@pytest.mark.parametrize("cursor", ["garbage", "e30", "!!", "eyJrIjoiZWRpdHMiLCJhIjoiMSJ9"])
def test_bad_cursor_is_invalid_input(synced: Session, cursor: str) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.list_versions(synced, MODEL, cursor=cursor)
    assert err.value.field == "cursor"


def test_cursor_of_one_listing_is_refused_by_the_other(synced: Session) -> None:
    for _ in range(3):
        ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    synced.commit()
    cursor = ledger.list_edits(synced, MODEL, limit=1).next_cursor
    assert cursor is not None
    with pytest.raises(InvalidInput):
        ledger.list_versions(synced, MODEL, cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, ledger.MAX_PAGE + 1])
def test_limit_out_of_range(synced: Session, limit: int) -> None:
    with pytest.raises(InvalidInput) as err:
        ledger.list_edits(synced, MODEL, limit=limit)
    assert err.value.field == "limit"
