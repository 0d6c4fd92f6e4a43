"""``memedit keys create|list|revoke``: the API keys, written straight into the
ledger (no API call: the first key cannot need a key).

The ledger is ``DATABASE_URL`` when set, otherwise the embedded PostgreSQL of
``--data-dir`` (``./.memedit``, where ``memedit up`` keeps it), started for the
command if ``up`` is not running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from service.errors import ServiceError
from service.ledger import keys as ledger_keys
from service.settings import get_settings

app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)

DataDir = Annotated[
    Path,
    typer.Option(help="The embedded ledger's directory (when DATABASE_URL is not set)."),
]


@contextmanager
def ledger_session(data_dir: Path) -> Iterator[Session]:
    """A session on the ledger (migrated to the newest schema), committed at the end."""
    from service import embedded  # noqa: PLC0415
    from service.ledger.sessions import create_ledger_engine, session_scope  # noqa: PLC0415
    from service.migrate import upgrade_to_head  # noqa: PLC0415

    url = os.environ.get("MEMEDIT_DATABASE_URL") or os.environ.get("DATABASE_URL")
    server = None
    if url:
        url = get_settings().database_url
    else:  # the embedded ledger: attached to if `up` runs it, started otherwise
        server, url = embedded.start_postgres(data_dir.expanduser().resolve())
    try:
        upgrade_to_head(url)
        engine = create_ledger_engine(url)
        try:
            with session_scope(engine) as session:
                yield session
        finally:
            engine.dispose()
    finally:
        if server is not None:
            server.cleanup()  # stops it only if no other process uses it


def _fail(exc: ServiceError) -> typer.Exit:
    typer.echo(f"error: {exc.message}", err=True)
    return typer.Exit(2)


@app.command()
def create(
    name: Annotated[str, typer.Option(help="A unique name; the ledger records it.")],
    scope: Annotated[
        list[str],
        typer.Option(help=f"Repeat for several: {', '.join(ledger_keys.SCOPES)}."),
    ],
    data_dir: DataDir = Path(".memedit"),
) -> None:
    """Create a key and print its secret, once, alone on the last line."""
    try:
        with ledger_session(data_dir) as s:
            key, secret = ledger_keys.create_key(s, name, scope)
            scopes = ", ".join(key.scopes)
    except ServiceError as exc:
        raise _fail(exc) from None
    typer.echo(f"created key {name!r} with scopes {scopes}; its secret (shown only now):")
    typer.echo(secret)


@app.command("list")
def list_(data_dir: DataDir = Path(".memedit")) -> None:
    """The keys: name, scopes, the secret's first characters, created, revoked."""
    with ledger_session(data_dir) as s:
        rows = [
            (k.name, ",".join(k.scopes), k.prefix + "…", k.created_at.isoformat(timespec="seconds"),
             k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-")
            for k in ledger_keys.list_keys(s)
        ]  # fmt: skip
    header = ("name", "scopes", "secret", "created", "revoked")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    data_dir: DataDir = Path(".memedit"),
) -> None:
    """Revoke a key: its secret stops working at once; it stays listed."""
    try:
        with ledger_session(data_dir) as s:
            ledger_keys.revoke_key(s, name)
    except ServiceError as exc:
        raise _fail(exc) from None
    typer.echo(f"revoked key {name!r}")
