"""The ``api_keys`` aggregate: keys with scopes, stored as the sha256 of their secret.

A secret is ``mk_`` and 43 URL-safe characters (32 random bytes), shown once when
the key is created (:func:`create_key`). The ledger keeps its sha256, enough to
recognise it (:func:`authenticate`) and useless to anyone who reads the table: the
secret is random, not a password, so a plain hash is as strong as a slow one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.ledger.tables import ApiKey, utcnow

# edits:write — submit edits and rollbacks; reads — every GET, score and generate;
# evaluations — run evaluations; admin — everything, including evaluation policies
SCOPES: tuple[str, ...] = ("edits:write", "reads", "evaluations", "admin")
PREFIX = "mk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
    """Add a key named ``name`` with ``scopes``; returns the row and its secret (the
    only time the secret is known). :class:`InvalidInput` for a bad name or scope,
    :class:`Conflict` for a name in use (a revoked key keeps its name)."""
    if not _NAME.fullmatch(name):
        raise InvalidInput("name", "1-64 letters, digits, '.', '_' or '-', starting alnum")
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise InvalidInput(
            "scope", f"unknown scope(s) {unknown}; known: {', '.join(SCOPES)}" if unknown
            else f"at least one scope is needed ({', '.join(SCOPES)})",
        )  # fmt: skip
    if session.scalar(select(exists().where(ApiKey.name == name))):
        raise Conflict("name", f"a key named {name!r} exists already")
    secret = PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, scopes=chosen, secret_sha256=_sha256(secret), prefix=secret[:10])
    session.add(key)
    session.flush()
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, active and revoked, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, name: str) -> ApiKey:
    """Revoke the key ``name`` (it stays listed; its secret stops working)."""
    key = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None:
        raise NotFound("name", f"no key named {name!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def any_active(session: Session) -> bool:
    """Whether any key is defined and not revoked (then every route but the open ones
    needs one)."""
    return bool(session.scalar(select(exists().where(ApiKey.revoked_at.is_(None)))))


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """The active key whose secret this is, or None."""
    if not secret.startswith(PREFIX):
        return None
    return session.scalar(
        select(ApiKey).where(ApiKey.secret_sha256 == _sha256(secret), ApiKey.revoked_at.is_(None))
    )
