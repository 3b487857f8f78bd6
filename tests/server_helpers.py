"""Helpers for the in-process server tests: an app around a tiny engine, an httpx client on
the ASGI transport (with the lifespan run), and an SSE parser."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
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
