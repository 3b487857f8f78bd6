"""The connection guard (server/connection_guard.py): which connection goes at the cap, the
descriptor budget, and on a real uvicorn on 127.0.0.1 the header and body deadlines, eviction
of idle connections and the 503 when every connection is busy."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn

from marble.server.connection_guard import (
    PROBE_ROOM,
    RESERVE,
    ConnectionLimits,
    ConnectionTable,
    connection_budget,
    connection_guarded,
)
from marble.server.stall_guard import stall_guarded
from tests.server_helpers import uvicorn_on_loopback

pytestmark = pytest.mark.anyio


def test_the_oldest_idle_connection_goes_first():
    table: ConnectionTable[str] = ConnectionTable(2)
    assert table.admit("a") is None
    assert table.admit("b") is None
    assert table.admit("c") == "a"  # oldest idle
    assert len(table) == 2
    table.busy("b")
    assert table.admit("d") == "c"  # b is busy: c is the oldest idle
    table.idle("b")  # b's response ended: now the newest idle
    assert table.admit("e") == "d"


def test_a_newcomer_is_refused_when_every_other_connection_is_busy():
    table: ConnectionTable[str] = ConnectionTable(1)
    assert table.admit("a") is None
    table.busy("a")
    assert table.admit("b") == "b"
    assert len(table) == 1
    table.remove("a")
    assert table.admit("c") is None


def test_the_budget_stays_below_the_descriptor_limit():
    assert connection_budget(None, 1024, 30) == 1024 - 30 - RESERVE
    assert connection_budget(100, 1024, 30) == 100
    assert connection_budget(10_000, 1024, 30) == 1024 - 30 - RESERVE
    assert connection_budget(None, 64, 30) == 1  # never zero: the server must answer someone


def make_app(hold: asyncio.Event) -> Any:
    """Answers with the body's length; `GET /hold` waits for `hold` first."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["path"] == "/hold":
            await hold.wait()
        body = str(size).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@asynccontextmanager
async def guarded_server(
    **limits: Any,
) -> AsyncIterator[tuple[int, uvicorn.Server, asyncio.Event]]:
    hold = asyncio.Event()
    defaults = {"header_timeout_s": 10.0, "body_timeout_s": 10.0, "max_connections": 100}
    http = connection_guarded(stall_guarded(60.0), ConnectionLimits(**{**defaults, **limits}))
    try:
        async with uvicorn_on_loopback(make_app(hold), http) as (port, server):
            yield port, server, hold
    finally:
        hold.set()


async def connect(port: int) -> socket.socket:
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    return client


async def read_until_closed(client: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (bounded by `timeout`)."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(client, 65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data


def status_and_body(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline():
    timeout_s = 1.0
    async with guarded_server(header_timeout_s=timeout_s) as (port, _, _):
        client = await connect(port)
        loop = asyncio.get_running_loop()
        request = b"GET / HTTP/1.1\r\nHost: m\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
        start = time.monotonic()
        closed = False
        for byte in request:  # 2.5 bytes a second: the whole request would take 45 s
            try:
                await loop.sock_sendall(client, bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if await _closed_within(client, 0.4):
                closed = True
                break
        elapsed = time.monotonic() - start
        client.close()
        assert closed, "a trickled request was never cut off"
        assert 0.9 * timeout_s <= elapsed < timeout_s + 5  # the deadline, not a per-byte timer


async def _closed_within(client: socket.socket, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            return await asyncio.get_running_loop().sock_recv(client, 65536) is not None
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_partial_request_gets_408_and_a_silent_connection_is_closed():
    async with guarded_server(header_timeout_s=0.5) as (port, _, _):
        partial, silent = await connect(port), await connect(port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(partial, b"GET / HTTP/1.1\r\nHost: m\r\n")
        status, headers, body = status_and_body(await read_until_closed(partial, 10))
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert await read_until_closed(silent, 10) == b""
        partial.close()
        silent.close()


async def test_a_body_that_does_not_arrive_in_time_gets_408():
    async with guarded_server(body_timeout_s=0.5) as (port, _, _):
        client = await connect(port)
        loop = asyncio.get_running_loop()
        head = b"POST / HTTP/1.1\r\nHost: m\r\nContent-Length: 100\r\n\r\n"
        await loop.sock_sendall(client, head + b"x" * 10)
        status, _, body = status_and_body(await read_until_closed(client, 10))
        client.close()
        assert status == 408
        assert "body" in json.loads(body)["error"]["message"]


async def test_a_new_connection_at_the_cap_closes_the_oldest_idle_one():
    async with guarded_server(max_connections=2) as (port, server, _):
        loop = asyncio.get_running_loop()
        oldest, other = await connect(port), await connect(port)
        while len(server.server_state.connections) < 2:
            await asyncio.sleep(0.01)
        client = await connect(port)
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        status, _, _ = status_and_body(await read_until_closed(client, 10))
        assert status == 200
        assert await read_until_closed(oldest, 10) == b""  # closed, nothing sent
        assert not await _closed_within(other, 0.2)  # the newer idle one stays
        for s in (oldest, other, client):
            s.close()


async def test_a_new_connection_gets_503_when_every_connection_is_busy():
    async with guarded_server(max_connections=1, retry_after_s=3) as (port, server, hold):
        loop = asyncio.get_running_loop()
        busy = await connect(port)
        await loop.sock_sendall(busy, b"GET /hold HTTP/1.1\r\nHost: m\r\n\r\n")
        while not server.server_state.tasks:
            await asyncio.sleep(0.01)
        client = await connect(port)
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: m\r\n\r\n")
        status, headers, body = status_and_body(await read_until_closed(client, 10))
        assert status == 503 and headers["retry-after"] == "3"
        assert json.loads(body)["error"]["type"] == "server_error"
        hold.set()
        response = b""
        while b"\r\n\r\n" not in response:  # the busy request still completes
            response += await loop.sock_recv(busy, 65536)
        assert status_and_body(response)[0] == 200
        busy.close()
        client.close()


async def test_a_keep_alive_connection_gets_a_fresh_header_deadline_per_request():
    timeout_s = 1.0
    async with guarded_server(header_timeout_s=timeout_s) as (port, _, _):
        client = await connect(port)
        loop = asyncio.get_running_loop()
        for _ in range(3):  # together longer than one deadline, each well within its own
            await asyncio.sleep(0.4 * timeout_s)
            await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: m\r\n\r\n")
            response = b""
            while not response.endswith(b"0"):
                chunk = await loop.sock_recv(client, 65536)
                assert chunk, "closed before its deadline"
                response += chunk
            assert status_and_body(response)[0] == 200
        client.close()


async def test_a_health_probe_gets_through_when_every_connection_is_busy():
    """A full table of busy connections (streams) must not fail the orchestrator's probe:
    a probe's request line is let through on a connection kept aside, closed after its
    answer; anything else there is refused, and past PROBE_ROOM waiting ones, at once."""
    async with guarded_server(max_connections=1) as (port, server, hold):
        loop = asyncio.get_running_loop()
        busy = await connect(port)
        await loop.sock_sendall(busy, b"GET /hold HTTP/1.1\r\nHost: m\r\n\r\n")
        while not server.server_state.tasks:
            await asyncio.sleep(0.01)
        for probe in (b"GET /health HTTP/1.1", b"HEAD /live?x=1 HTTP/1.1"):
            client = await connect(port)
            await loop.sock_sendall(client, probe[:6])  # the request line in two pieces
            await asyncio.sleep(0.05)
            await loop.sock_sendall(client, probe[6:] + b"\r\nHost: m\r\n\r\n")
            status, headers, _ = status_and_body(await read_until_closed(client, 10))
            assert status == 200  # and then closed: read_until_closed returned
            client.close()
        client = await connect(port)
        await loop.sock_sendall(client, b"POST /health HTTP/1.1\r\nHost: m\r\n\r\n")
        assert status_and_body(await read_until_closed(client, 10))[0] == 503
        client.close()
        waiting = [await connect(port) for _ in range(PROBE_ROOM)]
        while len(server.server_state.connections) < 1 + PROBE_ROOM:
            await asyncio.sleep(0.01)
        late = await connect(port)  # the room is full of silent ones: refused at once
        assert status_and_body(await read_until_closed(late, 10))[0] == 503
        hold.set()  # the busy request ends, so the server can stop
        for s in (*waiting, late, busy):
            s.close()
