"""Native stream events: the `Event` record, a bounded replay log, and per-subscriber queues.

A subscriber that falls behind loses intermediate `step` events (counted), never lifecycle
events; one that stops reading altogether is cut off rather than growing without bound.
Everything here runs on the event loop. Knows nothing of the engine or of HTTP.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

STEP = "step"
LIFECYCLE = (
    "request.queued",
    "request.started",
    "block.committed",
    "snapshot",
    "request.completed",
    "error",
)


@dataclass
class Event:
    """One SSE event. `seq` numbers a request's events from 1; `global_seq` numbers every
    event of the server (the dashboard stream's `id:`)."""

    name: str
    seq: int
    data: dict[str, Any]
    global_seq: int = 0
    _json: str | None = field(default=None, repr=False)

    @property
    def json(self) -> str:
        """Encoded once, however many subscribers receive it."""
        if self._json is None:
            self._json = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))
        return self._json


class EventLog:
    """The last `size` events, for `Last-Event-ID` resume."""

    def __init__(self, size: int, key: Callable[[Event], int] = lambda e: e.seq) -> None:
        self.events: deque[Event] = deque(maxlen=size)
        self.key = key

    def append(self, event: Event) -> None:
        self.events.append(event)

    @property
    def first(self) -> int | None:
        return self.key(self.events[0]) if self.events else None

    def after(self, last_id: int) -> list[Event] | None:
        """Events with id > last_id; None when some of them were already evicted."""
        first = self.first
        if first is None or first > last_id + 1:
            return None if first is not None else []
        return [e for e in self.events if self.key(e) > last_id]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)


class Subscriber:
    """A bounded mailbox for one SSE connection.

    `step` events beyond `capacity` pending are dropped (and `on_drop` called); the next step
    accepted after a drop is replaced by a `snapshot` from `resync` so the client catches up.
    Lifecycle events always queue, up to `hard_limit` pending; past that the subscriber is
    closed (the client can reconnect with `Last-Event-ID`).
    """

    def __init__(
        self,
        capacity: int,
        on_drop: Callable[[], None] = lambda: None,
        hard_limit: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.hard_limit = hard_limit or 8 * capacity
        self.on_drop = on_drop
        self.dropped = 0
        self.closed = False
        self._items: deque[Event | None] = deque()
        self._pending_steps = 0
        self._stale: set[tuple[str, int]] = set()  # (request, choice) that lost step events
        self._ready = asyncio.Event()

    def push(self, event: Event, resync: Callable[[Event], Event | None] | None = None) -> None:
        if self.closed:
            return
        if event.name == STEP:
            choice = (event.data.get("request_id", ""), event.data.get("choice_index", 0))
            if self._pending_steps >= self.capacity:
                self.dropped += 1
                self._stale.add(choice)
                self.on_drop()
                return
            if choice in self._stale and resync is not None:
                self._stale.discard(choice)
                snapshot = resync(event)
                if snapshot is not None:
                    event = snapshot
            if event.name == STEP:
                self._pending_steps += 1
        elif len(self._items) >= self.hard_limit:
            self.close()
            return
        self._items.append(event)
        self._ready.set()

    def replay(self, events: list[Event]) -> None:
        """Queue past events unthrottled: a resuming client asked for exactly these."""
        self._items.extend(events)
        self._pending_steps += sum(1 for e in events if e.name == STEP)
        self._ready.set()

    def close(self) -> None:
        """No more events: the reader sees the end of its stream after what is queued."""
        if not self.closed:
            self.closed = True
            self._items.append(None)
            self._ready.set()

    def get_nowait(self) -> Event | None:
        """The next event if one is queued now, else None (use `get` to wait)."""
        if not self._items or self._items[0] is None:
            return None
        return self._pop()

    async def get(self) -> Event | None:
        """The next event, or None once closed and drained."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._pop()

    def _pop(self) -> Event | None:
        event = self._items.popleft()
        if event is not None and event.name == STEP:
            self._pending_steps -= 1
        return event
