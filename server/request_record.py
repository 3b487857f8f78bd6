"""One HTTP request while it runs and shortly after: its choices, event log and listeners.

A `RequestRecord` holds one or more choices, each an engine request. It turns each
`StepOutput` into native events (payloads from native_events.py) in order, keeps them in a
bounded log for `Last-Event-ID` resume, fans them out to its subscribers and the dashboard's
firehose and, for OpenAI routes, queues the raw outputs for openai_format.py. It closes its
listeners once every choice has finished. Runs on the event loop; calls nothing above it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from marble.scheduler.engine import StepOutput
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.server.event_log import Event, EventLog
from marble.server.firehose import Firehose
from marble.server.metrics import Timing
from marble.server.native_events import NativeEvents
from marble.server.subscriber import StreamLimits, Subscriber


@dataclass
class Choice:
    index: int
    engine_id: str
    params: SamplingParams
    prompt_tokens: int
    blocks: list[tuple[int, int]]
    last: StepOutput | None = None
    timing: Timing | None = None
    finished: bool = False
    completed: Event | None = None  # its `request.completed` event, kept for late resyncs


@dataclass
class RequestRecord:
    request_id: str
    model: str
    n: int  # choices asked for; events carry `choice_index` when above 1
    draft_every: int
    log: EventLog
    events: NativeEvents
    firehose: Firehose
    limits: StreamLimits
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(default_factory=list)
    subscribers: set[Subscriber] = field(default_factory=set)
    # Raw outputs for an OpenAI route: lossless (bounded by the request's own step count).
    outputs: asyncio.Queue[tuple[int, StepOutput]] | None = None
    seq: int = 0
    finished_at: float | None = None
    _resynced: tuple[Event, Event] | None = field(default=None, repr=False)  # (step, snapshot)

    @property
    def multi(self) -> bool:
        return self.n > 1

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    # ------------------------------------------------------------------------ choices
    def add_choice(self, request: Request) -> Choice:
        """The next choice, for `request` (made with the registry's engine id)."""
        choice = Choice(
            len(self.choices),
            request.request_id,
            request.params,
            request.prompt_tokens,
            request.blocks,
        )
        self.choices.append(choice)
        return choice

    def drop_choice(self, choice: Choice) -> None:
        """Undo `add_choice` for a request the engine did not take."""
        self.choices.remove(choice)

    def queued(self, choice: Choice, prompt: str | list[int]) -> None:
        data = self.events.queued(
            self.created, self.model, choice.prompt_tokens, prompt, choice.params
        )
        self.publish("request.queued", choice, data)

    # ------------------------------------------------------------------------ events
    def publish(self, name: str, choice: Choice, data: dict[str, Any]) -> Event:
        self.seq += 1
        event = Event(name, self.seq, {**self._head(name, choice, self.seq), **data})
        self.log.append(event)
        self.firehose.publish(event, self.resync)
        for sub in list(self.subscribers):
            sub.push(event, self.resync)
        return event

    def _head(self, name: str, choice: Choice, seq: int) -> dict[str, Any]:
        head: dict[str, Any] = {"type": name, "request_id": self.request_id, "sequence_number": seq}
        if self.multi:
            head["choice_index"] = choice.index
        return head

    def resync(self, step: Event) -> Event:
        """A `snapshot` standing in for a `step` a subscriber could not take in time, built
        once however many subscribers missed that step: 300 dashboards catching up on the
        same step each rendered its draft, which held the event loop for tens of ms."""
        if self._resynced is None or self._resynced[0] is not step:
            index = step.data.get("choice_index", 0)
            self._resynced = (step, self.snapshot(self.choices[index], step.seq, step.global_seq))
        return self._resynced[1]

    def snapshot(self, choice: Choice, seq: int, global_seq: int = 0) -> Event:
        data = self.events.snapshot(
            choice.last, choice.params.max_tokens, len(choice.blocks), choice.finished
        )
        return Event("snapshot", seq, {**self._head("snapshot", choice, seq), **data}, global_seq)

    # ------------------------------------------------------------------------ outputs
    def on_output(self, choice: Choice, out: StepOutput, timing: Timing | None) -> None:
        prev_step = choice.last.step if choice.last else 0
        choice.timing = timing or choice.timing
        if out.step > prev_step:
            if prev_step == 0:
                self.publish("request.started", choice, self.events.started(timing))
            choice.last = out
            self.publish("step", choice, self.events.step(out, self.draft_every))
            if out.block_completed is not None:
                block = choice.blocks[out.block_completed]
                self.publish("block.committed", choice, self.events.block_committed(out, block))
        elif out.tokens or choice.last is None:
            choice.last = out
        if self.outputs is not None:
            self.outputs.put_nowait((choice.index, out))
        if out.finished:
            self._complete(choice, out)

    def _complete(self, choice: Choice, out: StepOutput) -> None:
        choice.finished = True
        if out.finish_reason == "error":
            self.publish("error", choice, self.events.error(out))
        data = self.events.completed(out, choice.prompt_tokens, choice.timing)
        choice.completed = self.publish("request.completed", choice, data)
        if all(c.finished for c in self.choices):
            self._close()

    def _close(self) -> None:
        self.finished_at = time.monotonic()
        for sub in list(self.subscribers):
            sub.close()
        self.subscribers.clear()

    # -------------------------------------------------------------------- listeners
    def subscribe(self, last_id: int | None = None) -> Subscriber:
        """Replay what the client missed (all of it without `last_id`), then live events.
        Events that fell out of the log are replaced by one snapshot per choice."""
        sub = self.limits.subscriber()
        replay = list(self.log) if last_id is None else self.log.after(last_id)
        if last_id is None and self.log.first not in (None, 1):
            replay = None
        if replay is None:
            for choice in self.choices:
                sub.push(self.snapshot(choice, self.seq))
                if choice.completed is not None:
                    sub.push(choice.completed)
        else:
            sub.replay(replay)
        if self.finished:
            sub.close()
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()
        self.subscribers.discard(sub)
