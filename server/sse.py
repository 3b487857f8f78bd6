"""One way to build an SSE response, shared by the OpenAI and native streams.

On server shutdown a stream is not cut: it gets up to the drain timeout to finish its request
and end with its final event; a stream that would never end (the dashboard feed) closes its
subscriber at once so it ends cleanly. Knows nothing of event contents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse

from server.events import Subscriber
from server.settings import Settings


def sse_response(
    settings: Settings,
    body: AsyncIterator[Any],
    *,
    ping: bool,
    endless: Subscriber | None = None,
) -> EventSourceResponse:
    shutdown = anyio.Event()

    async def close_on_shutdown() -> None:
        await shutdown.wait()
        if endless is not None:
            endless.close()

    return EventSourceResponse(
        body,
        ping=settings.ping_s if ping else 0,
        sep="\n",
        send_timeout=settings.send_timeout_s,
        shutdown_event=shutdown,
        shutdown_grace_period=settings.drain_timeout_s,
        data_sender_callable=close_on_shutdown if endless is not None else None,
    )
