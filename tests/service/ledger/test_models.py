"""The model rows of the ledger (service/ledger/models.py) on the real PostgreSQL, each
test inside a transaction that is rolled back."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import ledger
from service.errors import NotFound
from service.ledger.tables import Model
from service.settings import GuardPolicy, ModelSpec, Settings
from service.suites import EvaluationPolicy
from tests.service.conftest import MODEL, OTHER, POLICY, add_versions, edit_request


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
        "supersede": "auto",
        "evaluations": [],
    }


def test_unknown_model_is_not_found(synced: Session) -> None:
    with pytest.raises(NotFound) as err:
        ledger.create_edit_job(synced, "nope", "rome", None, [edit_request()])
    assert err.value.field == "model"
    with pytest.raises(NotFound):
        ledger.create_rollback_job(synced, "nope", 0)
    with pytest.raises(NotFound):
        ledger.list_edits(synced, "nope")


def test_head_version_number(synced: Session) -> None:
    model = ledger.get_model(synced, MODEL)
    assert ledger.head_version_number(synced, model.id) == 0  # the base, from the start
    add_versions(synced, MODEL, 4)
    assert ledger.head_version_number(synced, model.id) == 3
    assert dict((m.name, h) for m, h in ledger.list_models(synced)) == {MODEL: 3, OTHER: 0}


def test_settings_seed_the_policy_of_a_new_model_row(
    api_settings: Settings, session: Session
) -> None:
    spec = ModelSpec(source="x", evaluations=[EvaluationPolicy.model_validate(POLICY)])
    ledger.sync_models(session, api_settings.model_copy(update={"models": {"seeded": spec}}))
    session.commit()
    row = ledger.get_model(session, "seeded")
    assert row.policy["evaluations"][0]["name"] == "forgetting"
    assert row.policy["evaluations"][0]["thresholds"] == {"retention": {"min": 0.8, "max": None}}
