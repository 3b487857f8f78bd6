"""One HTTP request on the hub: its choices, its event log and its listeners.

A `RequestGroup` holds one or more choices, each an engine request. It turns each
`StepOutput` into native events (`request.started`, `step`, `block.committed`,
`request.completed`, `error`), keeps them in a bounded log for `Last-Event-ID` resume, fans
them out to its subscribers and, for OpenAI routes, queues the raw outputs for translation.
Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from marble.scheduler.engine import StepOutput
from marble.scheduler.healing import unheal
from marble.scheduler.request import SamplingParams
from marble.server.events import Event, EventLog, Subscriber
from marble.server.metrics import Timing

if TYPE_CHECKING:  # the hub owns groups; a group only calls back into it
    from marble.server.hub import Hub


def _num(x: float | None) -> float | None:
    """JSON-safe float (NaN and infinities become null)."""
    return x if x is not None and math.isfinite(x) else None


def _seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


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
class RequestGroup:
    """One HTTP request's choices, event log and listeners."""

    hub: Hub
    request_id: str
    model: str
    n: int  # choices asked for; events carry `choice_index` when above 1
    draft_every: int
    log: EventLog
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(default_factory=list)
    subscribers: set[Subscriber] = field(default_factory=set)
    # Raw outputs for an OpenAI route: lossless (bounded by the request's own step count).
    outputs: asyncio.Queue[tuple[int, StepOutput]] | None = None
    seq: int = 0
    finished_at: float | None = None

    @property
    def multi(self) -> bool:
        return self.n > 1

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def publish(self, name: str, choice: Choice, data: dict[str, Any]) -> Event:
        self.seq += 1
        head: dict[str, Any] = {
            "type": name,
            "request_id": self.request_id,
            "sequence_number": self.seq,
        }
        if self.multi:
            head["choice_index"] = choice.index
        event = Event(name, self.seq, {**head, **data})
        self.log.append(event)
        self.hub.broadcast(event, self)
        for sub in list(self.subscribers):
            sub.push(event, self.resync)
        return event

    def resync(self, step: Event) -> Event:
        """A `snapshot` standing in for a `step` a subscriber could not take in time."""
        index = step.data.get("choice_index", 0)
        return self.snapshot(self.choices[index], step.seq, step.global_seq)

    def snapshot(self, choice: Choice, seq: int, global_seq: int = 0) -> Event:
        out = choice.last
        tokens = out.tokens if out and out.tokens else [self.hub.mask_id] * choice.params.max_tokens
        data: dict[str, Any] = {
            "type": "snapshot",
            "request_id": self.request_id,
            "sequence_number": seq,
        }
        if self.multi:
            data["choice_index"] = choice.index
        data.update(
            step=out.step if out else 0,
            total_steps=out.total_steps if out else None,
            block_index=out.block_index if out else 0,
            num_blocks=len(choice.blocks),
            num_masked=out.num_masked if out else choice.params.max_tokens,
            tokens=tokens,
            draft=self.hub.draft(tokens, out.heal_text if out else ""),
            text=out.text if out else "",
            finished=choice.finished,
        )
        return Event("snapshot", seq, data, global_seq)

    # ------------------------------------------------------------------------ outputs
    def on_output(self, choice: Choice, out: StepOutput, timing: Timing | None) -> None:
        hub = self.hub
        prev_step = choice.last.step if choice.last else 0
        choice.timing = timing or choice.timing
        if out.step > prev_step:
            if prev_step == 0:
                started = timing.started if timing else None
                submitted = timing.submitted if timing else None
                self.publish("request.started", choice, {"queue_s": _seconds(submitted, started)})
            choice.last = out
            self.publish("step", choice, self._step_data(out))
            if out.block_completed is not None:
                start, end = choice.blocks[out.block_completed]
                ids = out.tokens[start:end]
                self.publish(
                    "block.committed",
                    choice,
                    {
                        "step": out.step,
                        "block_index": out.block_completed,
                        "num_blocks": out.num_blocks,
                        "start": start,
                        "tokens": ids,
                        "text": unheal(
                            hub.tokenizer.decode(ids), out.heal_text if start == 0 else ""
                        ),
                    },
                )
        elif out.tokens or choice.last is None:
            choice.last = out
        if self.outputs is not None:
            self.outputs.put_nowait((choice.index, out))
        if out.finished:
            self._complete(choice, out)

    def _step_data(self, out: StepOutput) -> dict[str, Any]:
        texts = self.hub.tokenizer.token_text([c.token_id for c in out.committed])
        data: dict[str, Any] = {
            "step": out.step,
            "total_steps": out.total_steps,
            "block_index": out.block_index,
            "num_blocks": out.num_blocks,
            "num_masked": out.num_masked,
            "committed": [
                {
                    "pos": c.pos,
                    "token_id": c.token_id,
                    "text": text,
                    "confidence": _num(c.confidence),
                    "logprob": _num(c.logprob),
                }
                for c, text in zip(out.committed, texts)
            ],
        }
        if self.draft_every and (out.step % self.draft_every == 0 or out.finished):
            data["draft"] = self.hub.draft(out.tokens, out.heal_text)
        return data

    def _complete(self, choice: Choice, out: StepOutput) -> None:
        choice.finished = True
        if out.finish_reason == "error":
            self.publish(
                "error",
                choice,
                {"message": out.error or "engine error", "code": out.error_code or "engine_error"},
            )
        t = choice.timing
        choice.completed = self.publish(
            "request.completed",
            choice,
            {
                "text": out.text,
                "finish_reason": out.finish_reason,
                "usage": {
                    "prompt_tokens": choice.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "total_tokens": choice.prompt_tokens + out.completion_tokens,
                },
                "steps": out.step,
                "timings": {
                    "queue_s": _seconds(t.submitted, t.started) if t else None,
                    "time_to_first_step_s": _seconds(t.submitted, t.first_step) if t else None,
                    "time_to_first_text_s": _seconds(t.submitted, t.first_text) if t else None,
                    "total_s": _seconds(t.submitted, t.finished) if t else None,
                },
            },
        )
        if all(c.finished for c in self.choices):
            self.hub.retire(self)
