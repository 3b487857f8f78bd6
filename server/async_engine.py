"""The one door to the engine thread: submit a request's choices (all or none), abort them,
stop. Everything on the event loop that reaches the engine goes through `AsyncEngine`.

Tokenizing and validating run in a worker thread (the tokenizer releases the GIL), so a long
prompt never stalls the event loop; queueing is then O(1) per choice. Refusals leave as the
scheduler's own exceptions (`InvalidParam` naming a field, `ValueError`, `QueueFullError`) or
`EngineClosed` once a drain has begun; admission.py turns them into HTTP errors. Knows nothing
of HTTP or response shapes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from marble.scheduler.engine import Engine
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.served_model import ServedModel
from marble.server.engine_thread import EngineThread
from marble.server.metrics import Metrics
from marble.server.registry import Registry
from marble.server.request_record import RequestRecord
from marble.structured.constraint import Constraint


@dataclass(frozen=True)
class Job:
    """One engine request to make: a prompt (text or token ids), its settings, a suffix."""

    prompt: str | list[int]
    params: SamplingParams
    suffix: str | list[int] | None = None
    model: str | None = None  # a served model's name (None: the first)
    constraint: Constraint | None = None  # structured output: what the text must match


class EngineClosed(RuntimeError):
    """The server is draining: it takes no new requests."""


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        registry: Registry,
        request_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine  # read-only from here: defaults, tokenizer, model config
        self.metrics = metrics
        self.registry = registry
        self.thread = EngineThread(
            engine, metrics, registry.deliver, request_timeout_s=request_timeout_s
        )
        self.closed = False

    def served(self, model: str | None = None) -> ServedModel:
        """A served model's tokenizer, serving defaults (a request's fields are merged over
        them) and context; None: the first. The name is checked by admission."""
        return self.engine.served(model)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.thread.start(loop)

    async def submit(self, record: RequestRecord, jobs: list[Job]) -> None:
        """Queue each job as the next choice of `record`, or none of them: a refusal aborts
        the choices already queued (they finish as aborted) and forgets a record that no
        choice reached the engine for."""
        engine = self.engine

        def prepare() -> list[Request]:
            return [
                engine.make_request(
                    job.prompt,
                    job.params,
                    Registry.engine_id(record, i),
                    job.suffix,
                    job.model,
                    job.constraint,
                )
                for i, job in enumerate(jobs)
            ]

        try:
            requests = await asyncio.to_thread(prepare)
            if self.closed:  # a drain may have begun while the prompts were tokenized
                raise EngineClosed("the server is shutting down")
            for job, request in zip(jobs, requests):
                choice = self.registry.route(record, request)
                try:
                    self.thread.submit(request)
                except BaseException:
                    self.registry.unroute(record, choice)
                    raise
                record.queued(choice, job.prompt)
        except BaseException:
            self.abort(record)
            self.registry.forget(record)
            raise

    def abort(self, record: RequestRecord) -> None:
        """Every unfinished choice leaves the batch at the next step (finishing as aborted)."""
        for choice in record.choices:
            if not choice.finished:
                self.thread.abort(choice.engine_id)

    def client_gone(self, record: RequestRecord) -> None:
        """The submitting client left: count it, and abort what still runs."""
        if not record.finished:
            self.metrics.disconnects.inc()
            self.abort(record)

    def close(self) -> None:
        """Refuse new submissions from now on (a drain has begun)."""
        self.closed = True

    async def stop(self) -> None:
        """Abort what is left, deliver its final outputs, join the thread."""
        await self.thread.stop()
