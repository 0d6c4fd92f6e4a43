"""Who may call a route: API keys with scopes (:mod:`service.ledger.keys`).

Every route but ``/healthz`` and ``/healthz/workers`` declares the scope it needs (:func:`requires`):
``reads`` for the GETs, score and generate; ``edits:write`` for edits and rollbacks;
``evaluations`` for evaluations; ``admin`` for evaluation policies (an ``admin`` key
may call everything). Clients send ``Authorization: Bearer <secret>``.

- Once any key is defined (and not revoked), every such route needs one: none or an
  unknown one → 401 with ``WWW-Authenticate: Bearer``; one without the scope → 403.
  The route gets the key's name, which the ledger records as ``requested_by``.
- With no key defined, the API serves loopback clients only (403 for any other),
  unless ``settings.insecure_no_auth``; the route gets None. ``memedit api`` and
  ``memedit up`` refuse to bind off loopback in that state (service/cli.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import SessionDep, SettingsDep
from service.errors import Forbidden, Unauthorized
from service.ledger import keys as ledger_keys

_bearer = HTTPBearer(auto_error=False, description="an API key: memedit keys create")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def requires(scope: str) -> Callable[..., str | None]:
    """A dependency: the calling key's name if it may use ``scope`` (None when no keys
    are defined and the client is local); raises 401/403 otherwise."""
    if scope not in ledger_keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(
        request: Request, session: SessionDep, settings: SettingsDep, credentials: Bearer
    ) -> str | None:
        if not ledger_keys.any_active(session):
            client = request.client.host if request.client else None
            if settings.insecure_no_auth or is_loopback(client):
                return None
            raise Forbidden(
                None,
                "no API keys are defined, so the API serves loopback clients only; "
                "create one (memedit keys create --name NAME --scope SCOPE)",
            )
        if credentials is None:
            raise Unauthorized("Authorization", "send an API key: Authorization: Bearer <key>")
        key = ledger_keys.authenticate(session, credentials.credentials.strip())
        if key is None:
            raise Unauthorized("Authorization", "unknown or revoked API key")
        if scope not in key.scopes and "admin" not in key.scopes:
            raise Forbidden(
                "Authorization",
                f"key {key.name!r} lacks the scope {scope!r} (it has {', '.join(key.scopes)})",
            )
        return key.name

    check.__name__ = f"requires_{scope.replace(':', '_')}"
    return check


Reads = Annotated[str | None, Depends(requires("reads"))]
EditsWrite = Annotated[str | None, Depends(requires("edits:write"))]
Evaluations = Annotated[str | None, Depends(requires("evaluations"))]
Admin = Annotated[str | None, Depends(requires("admin"))]
