"""Limits on what clients send.

- The request body cap (:class:`BodyLimit`): a body larger than
  ``settings.max_body_bytes`` is refused with 413 before anything parses it. A pure
  ASGI middleware (so it sees the bytes as they arrive): a declared
  ``Content-Length`` over the cap is refused without reading the body; otherwise the
  body is read up to the cap (chunked uploads included) and handed on to the app.
- The rate limit on work-creating requests (:func:`admit`): at most
  ``settings.rate_limit_per_minute`` new jobs per key (per client address while no
  key is defined) in each clock minute, counted in Redis; over it, 429 with
  ``Retry-After``. A replay of an ``Idempotency-Key`` creates nothing and is not
  counted. A Redis that does not answer admits the request (the ledger, not the
  counter, is what must not be lost).
"""

from __future__ import annotations

import json
import logging
import math
import time

from redis import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RateLimited
from service.settings import Settings

log = logging.getLogger(__name__)

TOO_LARGE = 413
_WINDOW_S = 60


def admit(redis: Redis, settings: Settings, who: str) -> None:
    """Count one work-creating request of ``who`` (a key name, or ``addr:<host>``);
    :class:`RateLimited` when it is over this minute's limit."""
    limit = settings.rate_limit_per_minute
    if limit <= 0:
        return
    now = time.time()
    window = int(now // _WINDOW_S)
    key = f"{settings.queue_prefix}:rate:{who}:{window}"
    try:
        pipe = redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 2 * _WINDOW_S)
        count = int(pipe.execute()[0])
    except RedisError as exc:
        log.warning("rate limit of %s not checked (Redis: %s); admitting", who, exc)
        return
    if count > limit:
        retry = max(1, math.ceil((window + 1) * _WINDOW_S - now))
        raise RateLimited(
            None,
            f"more than {limit} work-creating requests this minute from {who}; "
            f"try again in {retry} s",
            retry_after_s=retry,
        )


def is_upload(scope: Scope) -> bool:
    """A patch upload (``POST /v1/models/{m}/imports``): its route streams the body to
    disk under its own cap (``settings.max_upload_bytes``)."""
    path = str(scope.get("path", ""))
    return scope.get("method") == "POST" and path.startswith("/v1/models/") and path.endswith("/imports")  # fmt: skip


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 and memedit's error body
    (uploads, :func:`is_upload`, pass through: their route caps them as it streams)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"declares {declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, "is larger")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str) -> None:
        message = f"the request body {what} than the limit of {self.max_bytes} bytes"
        payload = json.dumps(
            {
                "detail": f"body: {message}",
                "errors": [{"field": "body", "message": message, "type": "too_large"}],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": TOO_LARGE,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
