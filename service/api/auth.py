"""Who may call a route: API keys with scopes (:mod:`service.ledger.keys`).

Every route but ``/healthz`` and ``/healthz/workers`` declares the scope it needs (:func:`requires`):
``reads`` for the GETs, score and generate; ``edits:write`` for edits and rollbacks;
``evaluations`` for evaluations; ``admin`` for evaluation policies (an ``admin`` key
may call everything). A route whose scope depends on what it names (cancelling a job:
``edits:write`` or ``evaluations`` by the job's kind) takes the :data:`Caller` and
checks :func:`allows` itself. Clients send ``Authorization: Bearer <secret>``.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Calling:
    """Who calls: a key's name and scopes, or ``None`` for both when no key is
    defined and the client may call anyway (loopback, or ``insecure_no_auth``)."""

    name: str | None
    scopes: tuple[str, ...] | None


def _authenticate(
    request: Request, session: SessionDep, settings: SettingsDep, credentials: Bearer
) -> Calling:
    """The caller, or 401/403 when keys exist and none valid was sent (or no key is
    defined and the client is not local)."""
    if not ledger_keys.any_active(session):
        client = request.client.host if request.client else None
        if settings.insecure_no_auth or is_loopback(client):
            return Calling(None, None)
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
    return Calling(key.name, tuple(key.scopes))


def allows(caller: Calling, scope: str) -> bool:
    """Whether ``caller`` may use ``scope`` (admin may use every scope)."""
    return caller.scopes is None or scope in caller.scopes or "admin" in caller.scopes


# a route that decides the scope itself (it depends on what the request names)
Caller = Annotated[Calling, Depends(_authenticate)]


def requires(scope: str) -> Callable[..., str | None]:
    """A dependency: the calling key's name if it may use ``scope`` (None when no keys
    are defined and the client is local); raises 401/403 otherwise."""
    if scope not in ledger_keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(caller: Caller) -> str | None:
        if not allows(caller, scope):
            scopes = ", ".join(caller.scopes or ())
            raise Forbidden(
                "Authorization",
                f"key {caller.name!r} lacks the scope {scope!r} (it has {scopes})",
            )
        return caller.name

    check.__name__ = f"requires_{scope.replace(':', '_')}"
    return check


Reads = Annotated[str | None, Depends(requires("reads"))]
EditsWrite = Annotated[str | None, Depends(requires("edits:write"))]
Evaluations = Annotated[str | None, Depends(requires("evaluations"))]
Admin = Annotated[str | None, Depends(requires("admin"))]
