"""One way to build an SSE response, shared by the OpenAI and native streams.

On server shutdown a stream is not cut: it gets up to the drain timeout to finish its request
and end with its final event; a stream that would never end (the dashboard feed) closes its
subscriber at once so it ends cleanly. Each open stream counts in `marble_open_streams` by
kind, and its body's cleanup runs as soon as it ends (finished, disconnected, or a client that
stopped reading dropped by server/stall_guard.py). Knows nothing of event contents.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from prometheus_client import Gauge
from sse_starlette import EventSourceResponse

from marble.server.settings import Settings
from marble.server.subscriber import Subscriber


def sse_response(
    settings: Settings,
    body: AsyncGenerator[Any, None],
    *,
    ping: bool,
    open_streams: Gauge,
    endless: Subscriber | None = None,
) -> EventSourceResponse:
    """`open_streams`: this stream's kind of `marble_open_streams`."""
    shutdown = anyio.Event()

    async def counted() -> AsyncIterator[Any]:
        open_streams.inc()
        try:
            async for item in body:
                yield item
        finally:
            open_streams.dec()
            await body.aclose()  # its cleanup runs now, not whenever it is collected

    async def close_on_shutdown() -> None:
        await shutdown.wait()
        if endless is not None:
            endless.close()

    return EventSourceResponse(
        counted(),
        ping=settings.ping_s if ping else 0,
        sep="\n",
        # A backstop for ASGI servers without the stall guard, which acts first under
        # `marble serve` (this one raises out of the app and uvicorn cannot free the socket).
        send_timeout=2 * settings.send_timeout_s,
        shutdown_event=shutdown,
        shutdown_grace_period=settings.drain_timeout_s,
        data_sender_callable=close_on_shutdown if endless is not None else None,
    )
