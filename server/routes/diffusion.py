"""Native step streams over SSE (named events, `id:` sequence numbers, ping comments).

`POST /v1/diffusion/generate` submits and streams; `GET /v1/diffusion/requests/{id}/events`
attaches to a running or recently finished request (resuming after `Last-Event-ID`);
`GET /v1/diffusion/events` follows every request, for dashboards. Only the submitting
connection's disconnect aborts a request; attached listeners just leave.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse

from marble.server.events import Subscriber
from marble.server.group import RequestGroup
from marble.server.protocol import GenerateRequest
from marble.server.routes.deps import RequestIdDep, StateDep, require_api_key
from marble.server.sse import sse_response
from marble.server.state import ServerState

router = APIRouter(prefix="/v1/diffusion", dependencies=[Depends(require_api_key)])
CHUNK_BYTES = 32 * 1024


def _last_id(header: str | None, query: int | None) -> int | None:
    if query is not None:
        return query
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return None


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]
LastEventQuery = Annotated[int | None, Query(alias="last_event_id", ge=0)]


@router.post("/generate")
async def generate(
    body: GenerateRequest, state: StateDep, request_id: RequestIdDep
) -> EventSourceResponse:
    state.check_model(body.model)
    hub = state.ready_hub()
    jobs = state.jobs(body, state.params(body.prompts), body.suffix)
    draft_every = 1 if body.diffusing else body.draft_every
    group = hub.create(request_id, state.model_name, len(jobs), draft_every, lossless=False)
    sub = hub.subscribe(group)  # before submitting, so it sees `request.queued`
    try:
        await state.submit(group, jobs)
    except Exception:
        hub.unsubscribe(group, sub)
        raise
    return _sse(state, sub, group, "generate", owner=True)


@router.get("/requests/{request_id}/events")
async def request_events(
    request_id: str,
    state: StateDep,
    last_event_id: LastEventId = None,
    last_event_query: LastEventQuery = None,
) -> EventSourceResponse:
    hub = state.ready_hub()
    group = hub.get(request_id)
    if group is None:
        raise state.reject(
            404,
            "invalid",
            f"no running or recently finished request {request_id!r}",
            param="request_id",
            code="request_not_found",
        )
    sub = hub.subscribe(group, _last_id(last_event_id, last_event_query))
    return _sse(state, sub, group, "attach", owner=False)


@router.get("/events")
async def all_events(
    request: Request,
    state: StateDep,
    last_event_id: LastEventId = None,
    last_event_query: LastEventQuery = None,
) -> EventSourceResponse:
    hub = state.ready_hub()
    sub = hub.subscribe_all(_last_id(last_event_id, last_event_query))
    return _sse(state, sub, None, "dashboard", owner=False, global_ids=True)


def _sse(
    state: ServerState,
    sub: Subscriber,
    group: RequestGroup | None,
    kind: str,
    *,
    owner: bool,
    global_ids: bool = False,
) -> EventSourceResponse:
    hub = state.hub
    assert hub is not None

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
            hub.unsubscribe(group, sub)
            if owner and group is not None:
                state.client_gone(group)

    return sse_response(
        state.settings,
        events(),
        ping=True,
        open_streams=state.metrics.open_streams.labels(kind),
        endless=sub if group is None else None,
    )
