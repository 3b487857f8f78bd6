"""The native stream's `Event` record (encoded for the wire once, however many listeners send
it) and the bounded `EventLog` that `Last-Event-ID` resumes from. Knows nothing of the engine
or of HTTP.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import ServerSentEvent

STEP = "step"  # the one event a slow listener may miss (subscriber.py)


@dataclass
class Event:
    """One SSE event. `seq` numbers a request's events from 1; `global_seq` numbers every
    event of the server (the dashboard stream's `id:`)."""

    name: str
    seq: int
    data: dict[str, Any]
    global_seq: int = 0
    _json: str | None = field(default=None, repr=False)
    _wire: dict[bool, bytes] = field(default_factory=dict, repr=False)

    @property
    def json(self) -> str:
        """Encoded once, however many subscribers receive it."""
        if self._json is None:
            self._json = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))
        return self._json

    def encode(self, global_ids: bool = False) -> bytes:
        """The SSE frame (`id:` = `global_seq` or `seq`), built once per id kind: with 300
        dashboards open, re-encoding per subscriber is what kept the event loop busy."""
        wire = self._wire.get(global_ids)
        if wire is None:
            seq = self.global_seq if global_ids else self.seq
            wire = ServerSentEvent(data=self.json, event=self.name, id=str(seq), sep="\n").encode()
            self._wire[global_ids] = wire
        return wire

    @property
    def size(self) -> int:
        """Bytes this event takes on the wire (what a subscriber's byte bound counts)."""
        return len(self.encode())


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
