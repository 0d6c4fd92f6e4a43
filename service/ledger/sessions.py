"""Engines and sessions of the ledger (SQLAlchemy 2, psycopg 3): one way to make each.

- :func:`create_ledger_engine`: an engine with the ledger's connection settings
  (pings a pooled connection before use; gives up connecting after
  :data:`CONNECT_TIMEOUT_S`). The API makes its own in its lifespan.
- :func:`get_engine`: one shared engine per URL for a process (the workers).
- :func:`session_scope`: a session whose transaction commits on success.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import get_settings

CONNECT_TIMEOUT_S = 5


def create_ledger_engine(url: str) -> Engine:
    return create_engine(
        url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    return create_ledger_engine(url or get_settings().database_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with session_factory(engine)() as session, session.begin():
        yield session
