"""The server's life: loading -> ready -> draining -> stopped (or failed), as `/health` says.

`Lifecycle` loads the checkpoint (in a worker thread, after the socket listens), builds what
serving needs once the model is there (the `AsyncEngine` with its registry, event builders and
firehose), and drains on shutdown. `ready()` is how a route gets the engine: it answers 503
while there is none to serve with. Knows nothing of request bodies or response shapes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

from marble.model.default import CHECKPOINT_DIR
from marble.model.device import resolve_device
from marble.scheduler.engine import Engine
from marble.scheduler.scheduler import SchedulerConfig
from marble.scheduler.served_model import load_served
from marble.server.async_engine import AsyncEngine
from marble.server.draft import DraftRenderer
from marble.server.errors import APIError
from marble.server.firehose import Firehose
from marble.server.metrics import Metrics
from marble.server.native_events import NativeEvents
from marble.server.registry import Registry
from marble.server.settings import Settings
from marble.server.subscriber import StreamLimits

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """Load the checkpoints named by the settings (the embedded model when none is), each
    extra one under its folder's name."""
    path = settings.model or CHECKPOINT_DIR
    config = SchedulerConfig(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_batch_tokens=settings.max_batch_tokens,
        max_kv_bytes=settings.kv_cache_bytes,
        prefix_cache=settings.prefix_cache,
    )
    device = resolve_device(settings.device)
    log.info("loading %s on %s", path, device)
    engine = Engine.from_pretrained(
        path,
        device,
        settings.dtype,
        config=config,
        progress=False,
        name=first_name(settings),
        compile=settings.compile,
    )
    for extra in settings.also_serve:
        log.info("loading %s on %s", extra, device)
        engine.add_model(
            load_served(
                extra, extra.name, device, settings.dtype, progress=False, compile=settings.compile
            )
        )
    return engine


def first_name(settings: Settings) -> str:
    """The name clients send for the first model (the default of a request naming none)."""
    if settings.served_model_name:
        return settings.served_model_name
    return "marble" if settings.model is None else Path(settings.model).name


class Lifecycle:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine: AsyncEngine | None = None
        # Each served model's draft renderer, by name, built with the engine.
        self.drafts: dict[str, DraftRenderer] = {}
        self.phase = "loading"
        self.load_error: str | None = None
        self.server: Any = None  # a uvicorn.Server to stop if loading fails (set by the CLI)
        self._given = engine  # an engine built by the caller (tests), served as it is
        self._load_task: asyncio.Task | None = None
        self.model_name = first_name(settings)
        extra = [p.name for p in settings.also_serve] if engine is None else list(engine.models)[1:]
        self.model_names = [self.model_name, *extra]  # the first is a request's default
        if len(set(self.model_names)) < len(self.model_names):
            raise ValueError(f"served model names must differ: {self.model_names}")

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        if self._given is not None:
            self._start(self._given, loop)
        else:
            self._load_task = asyncio.create_task(self._load(loop))

    async def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            engine = await asyncio.to_thread(build_engine, self.settings)
        except Exception as exc:
            log.exception("could not load the model")
            self.phase, self.load_error = "failed", f"{type(exc).__name__}: {exc}"
            if self.server is not None:
                self.server.should_exit = True
            return
        self._start(engine, loop)

    def _start(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        s = self.settings
        limits = StreamLimits(
            s.subscriber_queue_size, s.subscriber_max_bytes, self.metrics.dropped_events.inc
        )
        engine.rename(engine.first.name, self.model_name)
        # One renderer of drafts per model, for both output formats.
        events = {}
        for name, served in engine.models.items():
            self.drafts[name] = DraftRenderer(served.tokenizer, s.mask_placeholder)
            events[name] = NativeEvents(served.tokenizer, self.drafts[name], served.shown_params)
        registry = Registry(s, events, Firehose(s.global_log_size, limits), limits)
        self.engine = AsyncEngine(engine, self.metrics, registry, s.request_timeout_s)
        self.metrics.kv_cache_budget.set(engine.scheduler.kv_budget)
        # What loading left behind (the tokenizer's tables, the model's modules) lives as long
        # as the server: out of the collector's reach, full collections stay short pauses of
        # the event loop instead of walking those objects every time.
        gc.freeze()
        self.engine.start(loop)
        self.phase = "ready"
        log.info("ready: serving %s", ", ".join(repr(n) for n in self.model_names))

    def ready(self) -> AsyncEngine:
        """The engine, or a 503 (with Retry-After) saying why there is none to serve with."""
        if self.phase == "ready" and self.engine is not None and not self.engine.closed:
            return self.engine
        raise self.not_ready()

    def not_ready(self) -> APIError:
        message = {
            "loading": "the model is still loading",
            "draining": "the server is shutting down",
            "failed": f"the model failed to load: {self.load_error}",
        }.get(self.phase, "the server is not ready")
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        return APIError(503, message, code="not_ready", headers=retry, reason="not_ready")

    async def drain(self) -> None:
        """Refuse new work (503 + Retry-After), let running requests finish for up to the
        drain timeout, abort what is left, stop the engine thread.

        The CLI runs it on SIGTERM/SIGINT while the socket still listens (server/drain.py);
        the lifespan runs it again at exit, when it finds nothing left to do."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.phase == "ready":
            self.phase = "draining"
        if self.engine is None:
            return
        self.engine.close()
        registry = self.engine.registry
        if registry.num_running:
            log.info(
                "draining: %d running requests get up to %g s to finish",
                registry.num_running,
                self.settings.drain_timeout_s,
            )
        try:
            await asyncio.wait_for(registry.idle.wait(), self.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: aborting %d requests", registry.num_running)
        await self.engine.stop()

    def abort_running(self) -> None:
        """Cut a drain short: every running request ends now, answered 503 `aborted`."""
        if self.engine is not None:
            for record in self.engine.registry:
                self.engine.abort(record)

    async def shutdown(self) -> None:
        await self.drain()
        if self.phase != "failed":
            self.phase = "stopped"
