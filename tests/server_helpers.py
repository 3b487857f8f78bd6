"""Helpers for the in-process server tests: an app around a tiny engine, an httpx client on
the ASGI transport (with the lifespan run), and an SSE parser."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from marble.scheduler.engine import Engine
from marble.scheduler.scheduler import SchedulerConfig
from marble.server.app import create_app
from marble.server.settings import Settings


def tiny_engine(path: Path, **config: Any) -> Engine:
    return Engine.from_pretrained(path, config=SchedulerConfig(**config), progress=False)


@asynccontextmanager
async def serving(
    path: Path, settings: Settings | None = None, engine: Engine | None = None, **config: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings or Settings(), engine or tiny_engine(path, **config))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://marble") as client:
            yield app, client


@asynccontextmanager
async def serving_loaded(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app that loads its checkpoints itself (as `marble serve` does, in a worker thread),
    and a client once `/health` says they are ready."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://marble") as client:
            for _ in range(600):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def uvicorn_on_loopback(
    app: Any, http: type[asyncio.Protocol]
) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """A real uvicorn on 127.0.0.1 and a free port, in this event loop, speaking `http` (the
    app's lifespan is the caller's), stopped when the block ends."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), http=http, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield config.port, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(serve, 30)


@dataclass
class SSE:
    event: str | None
    id: str | None
    data: str
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(text: str) -> list[SSE]:
    """Split a text/event-stream body into events (comments kept on the next event)."""
    events: list[SSE] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event = SSE(None, None, "")
        data = []
        for line in block.split("\n"):
            if line.startswith(":"):
                event.comments.append(line)
            elif line.startswith("event: "):
                event.event = line[7:]
            elif line.startswith("id: "):
                event.id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        event.data = "\n".join(data)
        if data or event.event:
            events.append(event)
    return events
