"""Every live and recently finished request by id, and where each engine request's outputs go.

`create` makes a `RequestRecord`; `route` ties an engine request to its record and choice;
`deliver` (on the event loop, once per engine step) hands each `StepOutput` to its record.
Finished records stay attachable for a while (`retain_finished_s`, `retain_finished_max`).
`idle` is set while no engine request is in flight, which is what a drain waits for. Calls
nothing above it: it never talks to the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterator

from marble.scheduler.request import Request
from marble.server.event_log import EventLog
from marble.server.firehose import Firehose
from marble.server.metrics import Delivery
from marble.server.native_events import NativeEvents
from marble.server.request_record import Choice, RequestRecord
from marble.server.settings import Settings
from marble.server.subscriber import StreamLimits

# Response ids are the request id behind these (openai_format.py); attaching takes either.
ID_PREFIXES = ("chatcmpl-", "cmpl-", "gen-")


class Registry:
    def __init__(
        self,
        settings: Settings,
        events: dict[str, NativeEvents],
        firehose: Firehose,
        limits: StreamLimits,
    ) -> None:
        self.settings = settings
        self.events = events  # by served model name: each renders with its own tokenizer
        self.firehose = firehose
        self.limits = limits
        self.records: OrderedDict[str, RequestRecord] = OrderedDict()
        self.routes: dict[str, tuple[RequestRecord, Choice]] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    def create(
        self, request_id: str, model: str, n: int, draft_every: int | None, lossless: bool
    ) -> RequestRecord:
        """A new request; `lossless` gives it an `outputs` queue for an OpenAI route."""
        self._prune()
        record = RequestRecord(
            request_id=request_id,
            model=model,
            n=n,
            draft_every=self.settings.draft_every if draft_every is None else draft_every,
            log=EventLog(self.settings.event_log_size),
            events=self.events[model],
            firehose=self.firehose,
            limits=self.limits,
            outputs=asyncio.Queue() if lossless else None,
        )
        self.records[request_id] = record
        return record

    @staticmethod
    def engine_id(record: RequestRecord, index: int) -> str:
        """The engine's id for choice `index` of `record` (the first keeps the request's id)."""
        return record.request_id if index == 0 else f"{record.request_id}-{index}"

    def route(self, record: RequestRecord, request: Request) -> Choice:
        """`request`'s outputs go to a new choice of `record` from now on."""
        choice = record.add_choice(request)
        self.routes[request.request_id] = (record, choice)
        self.idle.clear()
        return choice

    def unroute(self, record: RequestRecord, choice: Choice) -> None:
        """Undo `route` for a request the engine did not take."""
        record.drop_choice(choice)
        self.routes.pop(choice.engine_id, None)
        self._update_idle()

    def forget(self, record: RequestRecord) -> None:
        """Drop a record none of whose choices reached the engine."""
        if not record.choices:
            self.records.pop(record.request_id, None)

    def get(self, request_id: str) -> RequestRecord | None:
        record = self.records.get(request_id)
        if record is None:
            for prefix in ID_PREFIXES:
                if request_id.startswith(prefix):
                    record = self.records.get(request_id[len(prefix) :])
                    break
        return record

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self.records.values()))

    @property
    def num_running(self) -> int:
        """Engine requests in flight (choices, not HTTP requests)."""
        return len(self.routes)

    def deliver(self, delivery: Delivery) -> None:
        """Runs on the event loop, once per engine step."""
        for out, timing in delivery:
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            record, choice = route
            if out.finished:
                del self.routes[out.request_id]
            record.on_output(choice, out, timing)
        self._update_idle()

    def _update_idle(self) -> None:
        if not self.routes:
            self.idle.set()

    def _prune(self) -> None:
        """Forget finished requests past their retention time or over the count limit."""
        now = time.monotonic()
        finished = [r for r in self.records.values() if r.finished]
        excess = len(finished) - self.settings.retain_finished_max
        for r in finished:
            too_old = now - (r.finished_at or now) > self.settings.retain_finished_s
            if excess > 0 or too_old:
                self.records.pop(r.request_id, None)
                excess -= 1
