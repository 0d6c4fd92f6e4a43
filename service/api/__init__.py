"""The HTTP API (FastAPI): :func:`create_app` in :mod:`service.api.main`, the shared
dependencies in :mod:`service.api.deps`, one router per resource in
:mod:`service.api.routes`. OpenAPI docs at ``/docs``."""

from service.api.main import create_app

__all__ = ["create_app"]
