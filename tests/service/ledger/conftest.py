"""The ledger tests' fixture: the configured models synced into the rolled-back session
(``session``, tests/conftest.py: every test runs in a transaction that is rolled back)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from service import ledger
from service.settings import Settings


@pytest.fixture
def synced(session: Session, api_settings: Settings) -> Session:
    ledger.sync_models(session, api_settings)
    session.commit()
    return session
