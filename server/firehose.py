"""The dashboard's stream of every request's events (`GET /v1/diffusion/events`).

Every published event gets a server-wide `global_seq` (the stream's `id:`), stays in a bounded
log for resume, and goes to each dashboard subscriber. Runs on the event loop; knows nothing of
HTTP or of what events hold.
"""

from __future__ import annotations

from collections.abc import Callable

from marble.server.event_log import Event, EventLog
from marble.server.subscriber import StreamLimits, Subscriber

DASHBOARD_SCALE = 4  # a dashboard follows many requests: its mailbox holds 4x the steps


class Firehose:
    def __init__(self, log_size: int, limits: StreamLimits) -> None:
        self.log = EventLog(log_size, key=lambda e: e.global_seq)
        self.limits = limits
        self.seq = 0
        self.subscribers: set[Subscriber] = set()

    def publish(self, event: Event, resync: Callable[[Event], Event | None]) -> None:
        self.seq += 1
        event.global_seq = self.seq
        self.log.append(event)
        for sub in list(self.subscribers):
            sub.push(event, resync)

    def subscribe(self, last_id: int | None = None) -> Subscriber:
        """Live events from now on, after what the log still holds past `last_id`."""
        sub = self.limits.subscriber(DASHBOARD_SCALE)
        if last_id is not None:
            sub.replay(self.log.after(last_id) or [])
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()
        self.subscribers.discard(sub)
