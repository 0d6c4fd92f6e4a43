"""The history for dashboards (service/ledger/history.py): filtered listings, single
items and time series over versions, on the real PostgreSQL in a rolled-back
transaction (versions and applied edits written as a worker writes them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import ledger
from service.errors import InvalidInput, NotFound
from service.ledger import edits as ledger_edits
from service.ledger import history
from service.ledger.history import EditFilter
from service.ledger.tables import Edit, EditStatus, Evaluation, JobStatus, Version, VersionKind
from service.suites import EvaluationPolicy
from tests.service.conftest import MODEL, add_versions, edit_request


def _applied(s: Session) -> list[Edit]:
    """Versions 0..3; edits of Eiffel/Louvre/Colosseum applied by versions 1..3 (the
    Colosseum's by ROME, the others by MEMIT), and one queued edit."""
    add_versions(s, MODEL, 4)
    subjects = ["The Eiffel Tower", "The Louvre", "The Colosseum", "Big Ben"]
    jobs = [
        ledger.create_edit_job(
            s, MODEL, "memit" if i < 2 else "rome", None, [edit_request(subject=subject)]
        )  # fmt: skip
        for i, subject in enumerate(subjects)
    ]
    s.commit()
    mid = ledger.get_model(s, MODEL).id
    versions = {v.number: v.id for v in s.scalars(select(Version).where(Version.model_id == mid))}
    rows = [j.edits[0] for j in jobs]
    for number, edit in enumerate(rows[:3], start=1):
        score = {"efficacy": 1.0, "paraphrase": 0.5 * number, "neighborhood": 0.9}
        ledger_edits.mark_applied(s, versions[number], {edit.id: score})
    s.commit()
    return rows


def test_edits_are_filtered_by_subject_method_status_time_and_version(synced: Session) -> None:
    rows = _applied(synced)

    def subjects(**where: object) -> list[str]:
        found = history.list_edits(synced, MODEL, EditFilter(**where))  # type: ignore[arg-type]
        return [e.subject for e in found.items]

    assert subjects(subject="louvre") == ["The Louvre"]  # any case, a substring
    assert subjects(subject="%") == []  # LIKE's wildcards are plain text
    assert subjects(method="rome") == ["The Colosseum", "Big Ben"]
    assert subjects(status=EditStatus.queued) == ["Big Ben"]
    assert subjects(min_version=2) == ["The Louvre", "The Colosseum"]
    assert subjects(min_version=1, max_version=1) == ["The Eiffel Tower"]
    now = datetime.now(UTC)
    assert len(subjects(since=now - timedelta(hours=1))) == 4
    assert subjects(until=now - timedelta(hours=1)) == []
    with pytest.raises(InvalidInput) as bad:
        history.list_edits(synced, MODEL, EditFilter(min_version=3, max_version=1))
    assert bad.value.field == "min_version"
    one = history.get_edit(synced, MODEL, rows[1].id)
    assert one.subject == "The Louvre" and one.version is not None and one.version.number == 2
    with pytest.raises(NotFound):
        history.get_edit(synced, MODEL, 10**6)


def test_a_version_with_its_edits_and_versions_by_kind(synced: Session) -> None:
    _applied(synced)
    detail = history.get_version(synced, MODEL, 2)
    assert detail.version.number == 2
    assert [e.subject for e in detail.edits] == ["The Louvre"]
    assert detail.guard_decision is None
    with pytest.raises(NotFound) as missing:
        history.get_version(synced, MODEL, 9)
    assert missing.value.field == "number"
    base = history.list_versions(synced, MODEL, kind=VersionKind.base)
    assert [v.number for v in base.items] == [0]
    assert len(history.list_versions(synced, MODEL, kind=VersionKind.edit).items) == 3


def test_series_over_versions(synced: Session) -> None:
    _applied(synced)
    drift = history.series(synced, MODEL, "drift")
    assert drift.x == [0, 1, 2, 3]
    (param,) = drift.series
    assert drift.series[param] == [None, pytest.approx(0.01), pytest.approx(0.02),
                                   pytest.approx(0.03)]  # fmt: skip
    norms = history.series(synced, MODEL, "update_norm")
    assert norms.series == {"update_norm": [None, 1.0, 2.0, 3.0]}
    scores = history.series(synced, MODEL, "edit_scores")
    assert scores.x == [1, 2, 3]
    assert scores.series["paraphrase"] == [0.5, 1.0, 1.5]
    assert scores.series["efficacy"] == [1.0, 1.0, 1.0]

    # evaluations: the latest finished run of each version, with the policy's thresholds
    model = ledger.get_model(synced, MODEL)
    policy = EvaluationPolicy.model_validate(
        {"suite": "retention", "every_versions": 1, "thresholds": {"efficacy": {"min": 0.8}}}
    )
    ledger.set_evaluation_policy(synced, MODEL, [policy])
    versions = {v.number: v.id for v in synced.scalars(select(Version).where(
        Version.model_id == model.id))}  # fmt: skip
    job = ledger.create_edit_job(synced, MODEL, "rome", None, [edit_request()])
    for number, value in ((1, 0.9), (2, 0.4), (2, 0.7)):
        synced.add(Evaluation(model_id=model.id, job_id=job.id, version=number,
                              version_id=versions[number], suite="retention",
                              status=JobStatus.succeeded, metrics={"efficacy": value}))  # fmt: skip
    synced.add(Evaluation(model_id=model.id, job_id=job.id, version=3, version_id=versions[3],
                          suite="retention", status=JobStatus.failed, metrics=None))  # fmt: skip
    synced.commit()
    evals = history.series(synced, MODEL, "evaluations", "retention")
    assert evals.x == [1, 2] and evals.series == {"efficacy": [0.9, 0.7]}
    assert evals.thresholds == {"efficacy": {"min": 0.8}}
    for name, suite, field in (("bogus", None, "name"), ("evaluations", None, "suite")):
        with pytest.raises(InvalidInput) as bad:
            history.series(synced, MODEL, name, suite)
        assert bad.value.field == field
