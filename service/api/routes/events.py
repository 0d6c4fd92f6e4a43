"""Server-Sent Events: everything that happens to a job (``GET /v1/jobs/{id}/events``)
or to a model (``GET /v1/models/{model}/events``), as it happens.

Each SSE event carries the ledger event's id (``id:``), its kind (``event:``) and
the :class:`~service.schemas.EventPublic` as JSON (``data:``). The events are rows of
the ledger written with the changes they report (:mod:`service.ledger.events`), so
a client that reconnects with ``Last-Event-ID`` (or ``?after=``) gets every event
after it and misses nothing. A job's stream replays the job's events from the start
and ends after its final status (succeeded, failed, cancelled); a model's stream
starts now (or after ``Last-Event-ID``) and runs until the client leaves. With
``?follow=false`` either sends what is recorded so far and closes. Any stream closes
after ``event_stream_max_s`` (600 s; an ``EventSource`` reconnects by itself with
``Last-Event-ID``, and proxies see no endless response). A comment
line every :data:`KEEPALIVE_S` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from service import ledger
from service.api.auth import requires
from service.api.deps import ERRORS, SessionDep
from service.errors import InvalidInput
from service.ledger import events as ledger_events
from service.schemas import EventPublic

router = APIRouter(tags=["events"], dependencies=[Depends(requires("reads"))])

POLL_S = 0.25  # how often a stream looks for new events
KEEPALIVE_S = 15.0
SSE = {200: {"content": {"text/event-stream": {}}, "description": "an SSE stream of events"}}
LastEventId = Annotated[
    str | None, Header(alias="Last-Event-ID", description="resume after this event id")
]
After = Annotated[int | None, Query(ge=0, description="resume after this event id")]
Follow = Annotated[
    bool,
    Query(description="false: send the events recorded so far, then close the stream"),
]


def _resume_after(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        try:
            return max(0, int(last_event_id.strip()))
        except ValueError:
            raise InvalidInput("Last-Event-ID", "must be an event id (an integer)") from None
    return after


def format_event(event: Any) -> str:
    body = EventPublic.model_validate(event).model_dump_json()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {body}\n\n"


async def _stream(
    request: Request,
    fetch: Callable[[Session, int], list[Any]],
    after_id: int,
    *,
    ends_with_job: bool,
    follow: bool = True,
) -> AsyncIterator[str]:
    sessions = request.app.state.sessions

    def read(last: int) -> list[tuple[int, bool, str]]:
        with sessions() as s:
            return [(r.id, ledger_events.is_final(r), format_event(r)) for r in fetch(s, last)]

    last, quiet_since = after_id, time.monotonic()
    closes_at = quiet_since + request.app.state.settings.event_stream_max_s
    yield "retry: 2000\n\n"
    while not await request.is_disconnected() and time.monotonic() < closes_at:
        rows = await anyio.to_thread.run_sync(read, last)
        for event_id, final, text in rows:
            if event_id == 0:  # the job had ended before (ledger_events.ended): no replay
                if last == 0:
                    yield text
                return
            last = event_id
            yield text
            if ends_with_job and final:
                return
        if rows:
            quiet_since = time.monotonic()
            if len(rows) >= ledger_events.BATCH:
                continue
        if not follow:
            return
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await anyio.sleep(POLL_S)


def _response(body: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


@router.get("/v1/jobs/{job_id}/events", responses={**ERRORS, **SSE}, response_model=None)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    last_event_id: LastEventId = None,
    after: After = None,
    follow: Follow = True,
) -> StreamingResponse:
    """The job's events from the start (or after ``Last-Event-ID``): its status
    changes, progress and versions; the stream ends with its final status."""
    job = ledger.get_job(session, job_id)
    key = job.id
    session.close()

    def fetch(s: Session, last: int) -> list[Any]:
        rows = ledger_events.after(s, job_id=key, after_id=last)
        if rows:
            return rows
        # nothing new: a job that has ended was streamed to its end already (a client
        # resuming after the final event), or ended before events were recorded
        ended = ledger_events.ended(s, key)
        return [] if ended is None else [ended]

    start = _resume_after(last_event_id, after) or 0
    return _response(_stream(request, fetch, start, ends_with_job=True, follow=follow))


@router.get("/v1/models/{model}/events", responses={**ERRORS, **SSE}, response_model=None)
def model_events(
    model: str,
    request: Request,
    session: SessionDep,
    last_event_id: LastEventId = None,
    after: After = None,
    follow: Follow = True,
) -> StreamingResponse:
    """Everything that happens to the model from now (or after ``Last-Event-ID``):
    its jobs' status and progress, new versions, guard rejections, evaluations and
    alerts. Runs until the client leaves."""
    model_id = ledger.get_model(session, model).id
    start = _resume_after(last_event_id, after)
    if start is None:
        start = ledger_events.last_id(session, model_id=model_id)
    session.close()

    def fetch(s: Session, last: int) -> list[Any]:
        return ledger_events.after(s, model_id=model_id, after_id=last)

    return _response(_stream(request, fetch, start, ends_with_job=False, follow=follow))
