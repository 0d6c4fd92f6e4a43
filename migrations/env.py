"""Alembic environment for the memedit ledger.

The URL comes from ``config.attributes["database_url"]`` when a caller passes one
(:func:`service.migrate.upgrade_to_head`), else from
``service.settings.get_settings().database_url``. The target metadata is the ORM's
(:mod:`service.ledger.tables`), so ``alembic check`` compares the schema against it.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from service.ledger.tables import Base
from service.settings import get_settings

config = context.config

# Only the alembic command line configures logging; a program that calls
# service.migrate keeps its own logging setup.
if config.config_file_name is not None and not config.attributes.get("keep_logging", False):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``) without connecting."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


# Serialises concurrent `upgrade head` runs (an API and a worker starting together):
# the second waits, then finds the schema at head. Any constant key will do.
_MIGRATION_LOCK_KEY = 0x6D656D65646974  # "memedit"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
