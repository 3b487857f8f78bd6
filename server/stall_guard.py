"""Drops a connection whose client has stopped taking bytes, at the transport.

asyncio pauses a transport once its write buffer passes the high-water mark, and uvicorn then
holds every send until it resumes. A client that never reads keeps it paused forever, and
uvicorn's `transport.close()` waits for the buffer to flush, so the socket, its buffers and
the stream's subscriber would all stay. Here a connection that stays paused for `timeout_s`
without its buffer shrinking by one byte is aborted: uvicorn sees a disconnect, the stream
ends and everything it held is freed. The kernel's send buffer is capped too: left to
autotune it absorbed megabytes per stalled socket before the transport ever paused.
Knows nothing of the application.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)

# Per-connection kernel send buffer (Linux doubles it) and the transport's pause point:
# plenty for event streams and JSON bodies (64 KB in flight is 640 KB/s at 100 ms RTT), and
# what a stalled client pins (about 50 KB, kernel and process) until it is dropped. Filling
# 300 stalled sockets' buffers is event-loop work: at 128 KB each it cost /health's p99 ~20 ms.
SEND_BUFFER_BYTES = 32 * 1024
WRITE_BUFFER_BYTES = 16 * 1024


def stall_guarded(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (h11 or httptools, as uvicorn would pick) with the guard."""

    class StallGuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _stall_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            if isinstance(transport, asyncio.WriteTransport):
                transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
            super().connection_made(transport)

        def pause_writing(self) -> None:
            super().pause_writing()
            self._check_stall(None)

        def resume_writing(self) -> None:
            self._cancel_stall()
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_stall()
            super().connection_lost(exc)

        def _check_stall(self, last_size: int | None) -> None:
            # While paused nothing new is written (uvicorn waits), so the buffer only shrinks
            # as the client takes bytes: the same size one period later means none were taken.
            size = self.transport.get_write_buffer_size()
            if last_size is not None and size >= last_size:
                log.info("dropping a connection that took no bytes for %g s", timeout_s)
                self._stall_timer = None
                self.transport.abort()
                return
            self._stall_timer = self.loop.call_later(timeout_s, self._check_stall, size)

        def _cancel_stall(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

    return StallGuardedProtocol
