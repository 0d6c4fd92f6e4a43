"""Alembic migrations for the memedit ledger (``alembic.ini`` lives here too).

Run them with :func:`service.migrate.upgrade_to_head`, ``memedit migrate``, or
``alembic -c migrations/alembic.ini upgrade head`` from any directory.
"""
