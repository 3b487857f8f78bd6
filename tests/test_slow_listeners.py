"""Listeners that read slowly or not at all: a subscriber's byte bound, the stall guard that
drops a connection taking no bytes (a real uvicorn on 127.0.0.1), and `marble_open_streams`
going up and back to 0 however a stream ends."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest

from marble.server.event_log import Event
from marble.server.settings import Settings
from marble.server.stall_guard import stall_guarded
from marble.server.subscriber import Subscriber
from tests.server_helpers import serving, uvicorn_on_loopback
from tests.test_server_streams import call_app

pytestmark = pytest.mark.anyio


def padded(name: str, seq: int, size: int) -> Event:
    return Event(name, seq, {"type": name, "sequence_number": seq, "pad": "x" * size})


async def test_subscriber_bounds_its_pending_bytes():
    sub = Subscriber(capacity=1000, hard_limit=1000, max_bytes=8192)
    for seq in range(1, 41):  # counts alone would queue all of them
        sub.push(padded("step", seq, 500))
        assert sub.pending_bytes <= sub.max_bytes // 2  # steps get half the budget
    assert sub.dropped > 0 and not sub.closed
    for seq in range(41, 81):
        sub.push(padded("block.committed", seq, 500))
        assert sub.pending_bytes <= sub.max_bytes
    assert sub.closed  # lifecycle events past the budget cut the subscriber off
    names = []
    while (event := await sub.get()) is not None:
        names.append(event.name)
    assert "block.committed" in names and sub.pending_bytes == 0


async def test_an_event_bigger_than_the_budget_reaches_a_reader_that_caught_up():
    sub = Subscriber(capacity=4, max_bytes=16 * 1024)
    sub.push(padded("request.completed", 1, 40 * 1024))
    assert not sub.closed and (await sub.get()).seq == 1
    sub.push(padded("request.completed", 2, 40 * 1024))
    sub.push(padded("request.completed", 3, 10))  # behind a full budget: cut off
    assert sub.closed


def open_streams(text: str) -> dict[str, float]:
    found = re.findall(r'^marble_open_streams\{kind="(\w+)"\} (\S+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


async def test_open_streams_gauge_goes_up_and_back_to_zero(llada_tiny_path):
    async with serving(llada_tiny_path) as (app, client):
        state = app.state.lifecycle
        gone = asyncio.Event()
        task = asyncio.create_task(call_app(app, "/v1/diffusion/events", {}, gone, "GET"))
        while not state.engine.registry.firehose.subscribers:
            await asyncio.sleep(0.01)
        r = await client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "steps": 4, "stream": True}
        )
        assert r.status_code == 200
        during = open_streams((await client.get("/metrics")).text)
        assert during == {"generate": 0, "attach": 0, "dashboard": 1, "completions": 0, "chat": 0}
        gone.set()
        await asyncio.wait_for(task, 10)
        assert not state.engine.registry.firehose.subscribers
        after = open_streams((await client.get("/metrics")).text)
        assert set(after) == {"generate", "attach", "dashboard", "completions", "chat"}
        assert all(v == 0 for v in after.values())


async def test_a_listener_that_stops_reading_is_dropped_and_freed(llada_tiny_path):
    timeout_s = 0.5
    settings = Settings(send_timeout_s=timeout_s)
    async with serving(llada_tiny_path, settings) as (app, _):
        firehose = app.state.lifecycle.engine.registry.firehose
        async with uvicorn_on_loopback(app, stall_guarded(timeout_s)) as (port, server):
            loop = asyncio.get_running_loop()
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", port))
            await loop.sock_sendall(client, b"GET /v1/diffusion/events HTTP/1.1\r\nHost: m\r\n\r\n")
            while not firehose.subscribers:
                await asyncio.sleep(0.01)
            (sub,) = firehose.subscribers
            # More than the kernel and transport buffers hold, less than the byte bound: the
            # stream stays open, blocked on a client that reads nothing.
            for seq in range(1, 41):
                sub.push(padded("snapshot", seq, 16 * 1024))
            assert not sub.closed
            start = time.monotonic()
            deadline = start + 10 * timeout_s + 10
            while firehose.subscribers or server.server_state.connections:
                assert time.monotonic() < deadline, "the stalled listener was never dropped"
                await asyncio.sleep(0.02)
            assert time.monotonic() - start >= 0.9 * timeout_s  # not before its time
            assert open_streams(app.state.lifecycle.metrics.render()[0].decode())["dashboard"] == 0
            client.close()
