"""Bounds what a connection may hold before it becomes a request, at the transport.

A request's headers must arrive within `header_timeout_s` of the connection opening (or of the
previous response ending) and its body within `body_timeout_s` of its headers: both deadlines
are absolute, so a byte every few seconds does not extend them. At most `max_connections` are
kept: one more closes the oldest idle connection (no request in progress) or, when none is
idle, is answered 503 and closed, so descriptors never run out and `accept()` never fails.
Only a health probe (`GET` or `HEAD` of one of `probe_paths`) still gets through a full table,
on one of PROBE_ROOM connections kept aside, so an orchestrator does not restart a replica
whose connections are all busy streaming. Knows nothing of the application but those paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from marble.server.protocol import error_body

if TYPE_CHECKING:
    from marble.server.settings import Settings

log = logging.getLogger(__name__)

# Connections asyncio accepts in one pass of its loop (uvicorn's `backlog`; asyncio's own
# default). A burst's descriptors exist before any protocol can refuse them, and a refused or
# evicted one is closed a few passes later, so the reserve keeps room for several bursts.
ACCEPT_BURST = 100
# The kernel's queue of connections not yet accepted. asyncio gives the kernel its accept
# burst as the queue too; kept at 100, a flood of connects overflowed it and a dropped SYN
# (a `/health` probe's too) waited a second for its retry. Set again once listening.
LISTEN_QUEUE = 2048
# Descriptors set aside beside the connections: checkpoint and tokenizer files, logs, the
# engine's threads, and the accept-and-refuse path (see ACCEPT_BURST).
RESERVE = 4 * ACCEPT_BURST + 64
# Connections past the cap that may wait for their request line, to be served if it is a
# probe's (then closed) and refused otherwise: a few probers at once, within RESERVE.
PROBE_ROOM = 8

C = TypeVar("C")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    retry_after_s: int = 1
    probe_paths: tuple[str, ...] = ("/health", "/live")


def widen_listen_queue(sockets: list[socket.socket]) -> None:
    """Give the listening sockets the kernel queue of LISTEN_QUEUE, leaving asyncio's accept
    burst as it is (the queue is the socket's, so a duplicate descriptor sets it)."""
    for sock in sockets:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as listener:
            listener.listen(LISTEN_QUEUE)


def connection_budget(requested: int | None, soft_limit: int, in_use: int) -> int:
    """The most connections to keep: `requested`, but never more than the descriptors left
    under `soft_limit` once those `in_use` and the reserve are set aside (at least one)."""
    room = max(1, soft_limit - in_use - RESERVE)
    return room if requested is None else min(requested, room)


def descriptor_limit() -> tuple[int, int]:
    """(this process's soft RLIMIT_NOFILE, descriptors it has open now)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs: assume a process just started
        in_use = 64
    return soft, in_use


def guard_limits(settings: Settings) -> ConnectionLimits:
    """The limits for this process, its connection cap measured against its descriptors now."""
    soft, in_use = descriptor_limit()
    cap = connection_budget(settings.max_connections, soft, in_use)
    if settings.max_connections is not None and cap < settings.max_connections:
        log.warning(
            "max_connections %d lowered to %d: RLIMIT_NOFILE %d leaves no room for more",
            settings.max_connections,
            cap,
            soft,
        )
    log.info(
        "keeping at most %d connections (RLIMIT_NOFILE %d, %d descriptors in use, %d reserved)",
        cap,
        soft,
        in_use,
        RESERVE,
    )
    return ConnectionLimits(
        settings.header_timeout_s, settings.body_timeout_s, cap, settings.retry_after_s
    )


class ConnectionTable(Generic[C]):
    """The connections counted against the cap, and which of them are idle, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[C] = set()
        self._idle: OrderedDict[C, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: C) -> C | None:
        """Count `conn` (idle); past the cap return who must go: the oldest idle connection,
        or `conn` itself when every other one is busy. Whoever goes is no longer counted."""
        self._open.add(conn)
        self._idle[conn] = None
        if len(self._open) <= self.limit:
            return None
        victim = next((c for c in self._idle if c is not conn), conn)
        self.remove(victim)
        return victim

    def idle(self, conn: C) -> None:
        if conn in self._open:
            self._idle[conn] = None
            self._idle.move_to_end(conn)

    def busy(self, conn: C) -> None:
        self._idle.pop(conn, None)

    def remove(self, conn: C) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)


def raw_error(status: int, message: str, code: str, headers: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's shape that closes the connection."""
    reasons = {408: "Request Timeout", 503: "Service Unavailable"}
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps(error_body(message, type_, None, code))
    lines = [
        f"HTTP/1.1 {status} {reasons[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def connection_guarded(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type[Any]:
    """`base` (a uvicorn HTTP protocol) with the deadlines and the cap; one class per server,
    whose connections share one table."""
    table: ConnectionTable[Any] = ConnectionTable(limits.max_connections)
    probes: set[Any] = set()  # connections past the cap waiting to show they are probes
    refusal = raw_error(
        503,
        "the server is at its connection limit; retry shortly",
        "too_many_connections",
        {"retry-after": str(limits.retry_after_s)},
    )
    timeouts = {
        "headers": raw_error(
            408,
            f"request headers not received within {limits.header_timeout_s:g} s",
            "request_timeout",
            {},
        ),
        "body": raw_error(
            408,
            f"request body not received within {limits.body_timeout_s:g} s",
            "request_timeout",
            {},
        ),
    }

    class ConnectionGuardedProtocol(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _waiting = "headers"  # "headers", "body", or "" while a request is being answered
        _waiting_for: object = None  # the request cycle whose body is awaited
        _partial = False  # some bytes of the next request have arrived
        _probe: bytes | None = None  # past the cap: what arrived before its request line

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            victim = table.admit(self)
            if victim is self and len(probes) < PROBE_ROOM:
                probes.add(self)
                self._probe = b""
                self._await("headers", None, limits.header_timeout_s)
                return
            if victim is self:
                self._refuse()
                return
            if victim is not None:
                log.info("at the connection cap (%d): closed the oldest idle one", table.limit)
                victim._close(None)
            self._await("headers", None, limits.header_timeout_s)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return  # refused or timed out: what comes now is never answered
            if self._probe is not None:
                data = self._probe + data
                line, found, _ = data.partition(b"\r\n")
                if not found and len(data) < 8192:
                    self._probe = data
                    return
                if not self._is_probe(line):
                    self._refuse()
                    return
                self._probe = None
            if self._waiting == "headers":
                self._partial = True
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self in probes:  # its room is for the next probe
                self._close(None)
                return
            self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            table.remove(self)
            probes.discard(self)
            super().connection_lost(exc)

        @staticmethod
        def _is_probe(line: bytes) -> bool:
            method, _, rest = line.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            return method in ("GET", "HEAD") and path in limits.probe_paths

        def _refuse(self) -> None:
            log.warning("at the connection cap (%d): answered a new one 503", table.limit)
            probes.discard(self)
            self._cancel()
            self.transport.write(refusal)
            self.transport.close()

        def _follow(self) -> None:
            """Arm the deadline that fits what the connection is waiting for now."""
            cycle = self.cycle
            if self.transport.is_closing():
                self._cancel()
                table.busy(self)
            elif cycle is None or cycle.response_complete:
                if self._waiting != "headers":
                    self._partial = False
                    table.idle(self)
                    self._await("headers", None, limits.header_timeout_s)
            elif cycle.more_body:
                if self._waiting != "body" or self._waiting_for is not cycle:
                    table.busy(self)
                    self._await("body", cycle, limits.body_timeout_s)
            else:
                table.busy(self)
                self._cancel()
                self._waiting = ""

        def _await(self, what: str, cycle: object, timeout_s: float) -> None:
            self._cancel()
            self._waiting, self._waiting_for = what, cycle
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting == "headers":
                log.info("closed a connection: no complete request headers in time")
                self._close(timeouts["headers"] if self._partial else None)
            elif self._waiting == "body":
                log.info("closed a connection: no complete request body in time")
                started = getattr(self.cycle, "response_started", True)
                self._close(None if started else timeouts["body"])

        def _close(self, response: bytes | None) -> None:
            self._cancel()
            table.remove(self)
            probes.discard(self)
            if not self.transport.is_closing():
                if response is not None:
                    self.transport.write(response)
                self.transport.close()

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    return ConnectionGuardedProtocol
