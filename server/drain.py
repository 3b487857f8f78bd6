"""`DrainingServer`: a `uvicorn.Server` that drains before it stops listening.

uvicorn's own signal handler closes the socket at once and re-raises the signal once it has
shut down (exit status -15, a KeyboardInterrupt traceback on SIGINT). Here SIGTERM or SIGINT
starts the application's drain while the socket still answers (503 + Retry-After), and uvicorn
shuts down only when the drain is done; a second signal aborts what is still running, so the
drain ends at once. Knows nothing of what a drain does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Coroutine[Any, Any, None]],
        abort: Callable[[], None],
        listening: Callable[[list[socket.socket]], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.abort = abort
        self.listening = listening  # called with the listening sockets once they listen
        self.signals = 0
        self._draining: asyncio.Task[None] | None = None
        self._aborted = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.listening is not None and self.started:
            self.listening([sock for server in self.servers for sock in server.sockets])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the event loop anywhere: only count, and let
        # `on_tick` (on the loop, every 0.1 s) act.
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._draining is None:
            log.info("shutting down: draining first (signal again to abort running requests)")
            self._draining = asyncio.create_task(self.drain())
        if self.signals > 1 and not self._aborted:
            log.warning("second signal: aborting running requests")
            self._aborted = True
            self.abort()
        if self._draining is not None and self._draining.done():
            # `should_exit` (not just returning True) is what sse-starlette watches to end
            # its streams, so endless ones close before uvicorn waits for connections.
            self.should_exit = True
        return await super().on_tick(counter)
