"""Native step streams over SSE (named events, `id:` sequence numbers, ping comments).

`POST /v1/diffusion/generate` submits and streams; `GET /v1/diffusion/requests/{id}/events`
attaches to a running or recently finished request (resuming after `Last-Event-ID`);
`GET /v1/diffusion/events` follows every request, for dashboards. Only the submitting
connection's disconnect aborts a request; attached listeners just leave.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from prometheus_client import Gauge
from sse_starlette import EventSourceResponse

from marble.server.errors import APIError
from marble.server.json_body import json_body, request_body
from marble.server.protocol import GenerateRequest
from marble.server.routes.deps import AdmissionDep, LifecycleDep, RequestIdDep, require_api_key
from marble.server.settings import Settings
from marble.server.sse import sse_response
from marble.server.subscriber import Subscriber

router = APIRouter(prefix="/v1/diffusion", dependencies=[Depends(require_api_key)])
CHUNK_BYTES = 32 * 1024


# A resume point is an event id as Marble sends them: ASCII digits, below 2**63 (so 19 digits at
# most, checked before `int()` sees the text: `str.isdigit` also accepts digits `int` refuses).
EVENT_ID_DIGITS = 19
EVENT_ID_LIMIT = 1 << 63


def _resume_point(value: str | None, param: str) -> int | None:
    """A `Last-Event-ID` header or `last_event_id` query value -> the id to resume after; None
    when absent or blank (replay from the start). Anything but an id Marble could have sent is
    a 400 naming `param`, the same for the header and the query."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    digits = len(text) <= EVENT_ID_DIGITS and text.isascii() and text.isdigit()
    if not digits or int(text) >= EVENT_ID_LIMIT:
        raise APIError(
            400,
            f"{param} must be an event id: ASCII digits, below 2**63",
            param=param,
            code="invalid_value",
            reason="invalid",
        )
    return int(text)


def _last_id(header: str | None, query: str | None) -> int | None:
    """The query (for clients that cannot set headers) wins over the header."""
    if query is not None:
        return _resume_point(query, "last_event_id")
    return _resume_point(header, "Last-Event-ID")


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]
LastEventQuery = Annotated[
    str | None,
    Query(alias="last_event_id", description="resume after this event id (digits, < 2**63)"),
]


@router.post("/generate", openapi_extra=request_body(GenerateRequest))
async def generate(
    body: Annotated[GenerateRequest, json_body(GenerateRequest)],
    admission: AdmissionDep,
    request_id: RequestIdDep,
) -> EventSourceResponse:
    engine = admission.ready(body.model)
    draft_every = 1 if body.diffusing else body.draft_every
    record = await admission.admit(
        engine,
        request_id,
        body,
        body.prompts(),
        body.suffix,
        lossless=False,
        draft_every=draft_every,
    )
    sub = record.subscribe()  # replays `request.queued`: nothing has run since the submission

    def leave() -> None:
        record.unsubscribe(sub)
        engine.client_gone(record)

    return _sse(admission.settings, engine.metrics.open_streams.labels("generate"), sub, leave)


@router.get("/requests/{request_id}/events")
async def request_events(
    request_id: str,
    lifecycle: LifecycleDep,
    last_event_id: LastEventId = None,
    last_event_query: LastEventQuery = None,
) -> EventSourceResponse:
    engine = lifecycle.ready()
    record = engine.registry.get(request_id)
    if record is None:
        raise APIError(
            404,
            f"no running or recently finished request {request_id!r}",
            param="request_id",
            code="request_not_found",
            reason="invalid",
        )
    sub = record.subscribe(_last_id(last_event_id, last_event_query))
    attach = lifecycle.metrics.open_streams.labels("attach")
    return _sse(lifecycle.settings, attach, sub, lambda: record.unsubscribe(sub))


@router.get("/events")
async def all_events(
    lifecycle: LifecycleDep,
    last_event_id: LastEventId = None,
    last_event_query: LastEventQuery = None,
) -> EventSourceResponse:
    firehose = lifecycle.ready().registry.firehose
    sub = firehose.subscribe(_last_id(last_event_id, last_event_query))
    dashboard = lifecycle.metrics.open_streams.labels("dashboard")
    return _sse(lifecycle.settings, dashboard, sub, lambda: firehose.unsubscribe(sub), endless=True)


def _sse(
    settings: Settings,
    open_streams: Gauge,
    sub: Subscriber,
    leave: Callable[[], None],
    *,
    endless: bool = False,
) -> EventSourceResponse:
    """`leave` runs once the stream ends, however it ends. `endless`: the dashboard feed,
    which numbers events server-wide and has no end of its own."""
    global_ids = endless

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            while (event := await sub.get()) is not None:
                # What is already queued leaves in one write, fewer sends and wake-ups, but at
                # most about one transport high-water mark: 300 listeners waking at once
                # must not each build a megabyte.
                chunk = [event.encode(global_ids)]
                size = len(chunk[0])
                while size < CHUNK_BYTES and (event := sub.get_nowait()) is not None:
                    chunk.append(event.encode(global_ids))
                    size += len(chunk[-1])
                yield b"".join(chunk)
        finally:
            leave()

    return sse_response(
        settings,
        events(),
        ping=True,
        open_streams=open_streams,
        endless=sub if endless else None,
    )
