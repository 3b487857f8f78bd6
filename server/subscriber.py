"""One SSE listener's bounded mailbox (`Subscriber`) and the limits every one gets.

A subscriber that falls behind loses intermediate `step` events (counted), never lifecycle
events; one that stops reading altogether is cut off rather than growing without bound, both
by count and by the encoded bytes it holds. Runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from marble.server.event_log import STEP, Event


@dataclass(frozen=True)
class StreamLimits:
    """What each new subscriber may hold (server settings), and what counts its drops."""

    capacity: int
    max_bytes: int
    on_drop: Callable[[], None]

    def subscriber(self, scale: int = 1) -> Subscriber:
        """A new mailbox; `scale` widens its step capacity (the dashboard's many requests)."""
        return Subscriber(scale * self.capacity, self.on_drop, max_bytes=self.max_bytes)


class Subscriber:
    """A bounded mailbox for one SSE connection.

    `step` events beyond `capacity` pending, or past half of `max_bytes` pending, are dropped
    (and `on_drop` called); the next step accepted after a drop is replaced by a `snapshot`
    from `resync` so the client catches up. Lifecycle events always queue, up to `hard_limit`
    events or `max_bytes` pending; past either the subscriber is closed (the client can
    reconnect with `Last-Event-ID`). So one subscriber never holds more than `max_bytes` plus
    one event, whatever its events weigh.
    """

    def __init__(
        self,
        capacity: int,
        on_drop: Callable[[], None] = lambda: None,
        hard_limit: int | None = None,
        max_bytes: int = 1 << 20,
    ) -> None:
        self.capacity = capacity
        self.hard_limit = hard_limit or 8 * capacity
        self.max_bytes = max_bytes
        self.on_drop = on_drop
        self.dropped = 0
        self.closed = False
        self.pending_bytes = 0
        self._items: deque[Event | None] = deque()
        self._pending_steps = 0
        self._stale: set[tuple[str, int]] = set()  # (request, choice) that lost step events
        self._ready = asyncio.Event()

    def push(self, event: Event, resync: Callable[[Event], Event | None] | None = None) -> None:
        if self.closed:
            return
        if event.name == STEP:
            choice = (event.data.get("request_id", ""), event.data.get("choice_index", 0))
            # Steps get half the byte budget, so lifecycle events still fit behind them.
            if self._pending_steps >= self.capacity or not self._fits(event, self.max_bytes // 2):
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
        if len(self._items) >= self.hard_limit or not self._fits(event, self.max_bytes):
            self.close()
            return
        self.pending_bytes += event.size
        self._items.append(event)
        self._ready.set()

    def _fits(self, event: Event, budget: int) -> bool:
        """An event bigger than the whole budget still goes to a reader that has caught up:
        otherwise that reader could never receive it."""
        return not self._items or self.pending_bytes + event.size <= budget

    def replay(self, events: list[Event]) -> None:
        """Queue past events unthrottled: a resuming client asked for exactly these."""
        self._items.extend(events)
        self._pending_steps += sum(1 for e in events if e.name == STEP)
        self.pending_bytes += sum(e.size for e in events)
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
        if event is not None:
            self.pending_bytes -= event.size
            if event.name == STEP:
                self._pending_steps -= 1
        return event
