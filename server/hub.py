"""Where every request's step outputs go, on the event loop.

The hub keeps live and recently finished `RequestGroup`s (server/group.py), routes each
engine `StepOutput` to its group and choice, and feeds the dashboard's all-requests stream.
Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.healing import unheal
from marble.scheduler.request import Request
from marble.server.engine_loop import Delivery, EngineLoop
from marble.server.events import Event, EventLog, Subscriber
from marble.server.group import Choice, RequestGroup
from marble.server.metrics import Metrics
from marble.server.settings import Settings

ID_PREFIXES = ("chatcmpl-", "cmpl-", "gen-")


class Hub:
    """Live and recently finished requests, the engine-id routing table, the dashboard feed."""

    def __init__(self, settings: Settings, tokenizer: TextTokenizer, metrics: Metrics) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.mask_id = tokenizer.special.mask
        self.stop_ids = tokenizer.special.stop_ids
        self.engine_loop: EngineLoop | None = None
        self.groups: OrderedDict[str, RequestGroup] = OrderedDict()
        self.routes: dict[str, tuple[RequestGroup, Choice]] = {}
        self.dashboard: set[Subscriber] = set()
        self.global_log = EventLog(settings.global_log_size, key=lambda e: e.global_seq)
        self.global_seq = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # ----------------------------------------------------------------------- requests
    def create(
        self, request_id: str, model: str, n: int, draft_every: int | None, lossless: bool
    ) -> RequestGroup:
        """A new request; `lossless` gives it an `outputs` queue for an OpenAI route."""
        self._prune()
        group = RequestGroup(
            hub=self,
            request_id=request_id,
            model=model,
            n=n,
            draft_every=self.settings.draft_every if draft_every is None else draft_every,
            log=EventLog(self.settings.event_log_size),
            outputs=asyncio.Queue() if lossless else None,
        )
        self.groups[request_id] = group
        return group

    @staticmethod
    def engine_id(group: RequestGroup, index: int) -> str:
        """The engine's id for choice `index` of `group` (the first keeps the group's id)."""
        return group.request_id if index == 0 else f"{group.request_id}-{index}"

    def submit(self, group: RequestGroup, request: Request, prompt: str | list[int]) -> Choice:
        """Queue one more choice of `group` (`request` made with `engine_id`); raises
        ValueError or QueueFullError."""
        assert self.engine_loop is not None
        params = request.params
        choice = Choice(
            len(group.choices), request.request_id, params, request.prompt_tokens, request.blocks
        )
        group.choices.append(choice)
        self.routes[request.request_id] = (group, choice)
        self.idle.clear()
        try:
            self.engine_loop.submit(request)
        except BaseException:
            group.choices.pop()
            self.routes.pop(request.request_id, None)
            self._update_idle()
            raise
        group.publish(
            "request.queued",
            choice,
            {
                "created": group.created,
                "model": group.model,
                "prompt_tokens": choice.prompt_tokens,
                # The prompt as sent (token ids decoded), so a dashboard card can show it.
                "prompt": prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt),
                "params": params.to_dict(),
            },
        )
        return choice

    def abort(self, group: RequestGroup) -> None:
        if self.engine_loop is None:
            return
        for choice in group.choices:
            if not choice.finished:
                self.engine_loop.abort(choice.engine_id)

    def discard(self, group: RequestGroup) -> None:
        """A request refused part-way through submission: abort the choices already queued
        (they finish as aborted), or forget the group if none was."""
        self.abort(group)
        if not group.choices:
            self.groups.pop(group.request_id, None)

    def get(self, request_id: str) -> RequestGroup | None:
        group = self.groups.get(request_id)
        if group is None:
            for prefix in ID_PREFIXES:
                if request_id.startswith(prefix):
                    group = self.groups.get(request_id[len(prefix) :])
                    break
        return group

    @property
    def active(self) -> int:
        return sum(1 for g in self.groups.values() if not g.finished)

    # --------------------------------------------------------------- engine -> groups
    def deliver(self, delivery: Delivery) -> None:
        """Runs on the event loop, once per engine step."""
        for out, timing in delivery:
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            group, choice = route
            if out.finished:
                del self.routes[out.request_id]
            group.on_output(choice, out, timing)
        self._update_idle()

    def retire(self, group: RequestGroup) -> None:
        group.finished_at = time.monotonic()
        for sub in list(group.subscribers):
            sub.close()
        group.subscribers.clear()
        self._update_idle()

    def _update_idle(self) -> None:
        if not self.routes:
            self.idle.set()

    def _prune(self) -> None:
        """Forget finished requests past their retention time or over the count limit."""
        now = time.monotonic()
        finished = [g for g in self.groups.values() if g.finished]
        excess = len(finished) - self.settings.retain_finished_max
        for g in finished:
            too_old = now - (g.finished_at or now) > self.settings.retain_finished_s
            if excess > 0 or too_old:
                self.groups.pop(g.request_id, None)
                excess -= 1

    # -------------------------------------------------------------------- subscribers
    def new_subscriber(self, capacity: int | None = None) -> Subscriber:
        return Subscriber(
            capacity or self.settings.subscriber_queue_size,
            self.metrics.dropped_events.inc,
            max_bytes=self.settings.subscriber_max_bytes,
        )

    def subscribe(self, group: RequestGroup, last_id: int | None = None) -> Subscriber:
        """Replay what the client missed (all of it without `last_id`), then live events.
        Events that fell out of the log are replaced by one snapshot per choice."""
        sub = self.new_subscriber()
        replay = list(group.log) if last_id is None else group.log.after(last_id)
        if last_id is None and group.log.first not in (None, 1):
            replay = None
        if replay is None:
            for choice in group.choices:
                sub.push(group.snapshot(choice, group.seq))
                if choice.completed is not None:
                    sub.push(choice.completed)
        else:
            sub.replay(replay)
        if group.finished:
            sub.close()
        else:
            group.subscribers.add(sub)
        return sub

    def unsubscribe(self, group: RequestGroup | None, sub: Subscriber) -> None:
        sub.close()
        if group is not None:
            group.subscribers.discard(sub)
        self.dashboard.discard(sub)

    def subscribe_all(self, last_id: int | None = None) -> Subscriber:
        sub = self.new_subscriber(4 * self.settings.subscriber_queue_size)
        if last_id is not None:
            sub.replay(self.global_log.after(last_id) or [])
        self.dashboard.add(sub)
        return sub

    def broadcast(self, event: Event, group: RequestGroup) -> None:
        self.global_seq += 1
        event.global_seq = self.global_seq
        self.global_log.append(event)
        for sub in list(self.dashboard):
            sub.push(event, group.resync)

    # ------------------------------------------------------------------------ helpers
    def draft(self, tokens: list[int], heal_text: str = "") -> str:
        """The whole canvas as text, each still-masked position shown as the placeholder.

        `heal_text` (token healing) is left out of a committed first token, as in the text."""
        parts: list[str] = []
        run: list[int] = []
        for token in tokens:
            if token in self.stop_ids:
                break
            if token == self.mask_id:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(self.settings.mask_placeholder)
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.decode(run))
        first_committed = bool(tokens) and tokens[0] != self.mask_id
        return unheal("".join(parts), heal_text if first_committed else "")
