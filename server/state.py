"""`ServerState`: the one object routes talk to (settings, metrics, engine thread, hub), and
the lifecycle phase `/health` reports: loading -> ready -> draining -> stopped (or failed).

Holds the checks every generation route shares (ready? known model? room in the queue?) so
routes stay thin. Knows nothing of response shapes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from starlette.requests import Request
from starlette.responses import Response

from marble.model.default import CHECKPOINT_DIR
from marble.scheduler.engine import Engine
from marble.scheduler.request import Request as EngineRequest
from marble.scheduler.request import SamplingParams
from marble.scheduler.scheduler import QueueFullError, SchedulerConfig
from marble.server.engine_loop import EngineLoop
from marble.server.errors import APIError
from marble.server.group import RequestGroup
from marble.server.hub import Hub
from marble.server.metrics import Metrics
from marble.server.protocol import SamplingBody
from marble.server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def build_engine(settings: Settings) -> Engine:
    """Load the checkpoint named by the settings (the embedded model when none is)."""
    path = settings.model or CHECKPOINT_DIR
    device = resolve_device(settings.device)
    config = SchedulerConfig(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_batch_tokens=settings.max_batch_tokens,
    )
    log.info("loading %s on %s", path, device)
    return Engine.from_pretrained(
        path, device, resolve_dtype(settings.dtype, device), config=config, progress=False
    )


@dataclass
class Job:
    prompt: str | list[int]
    params: SamplingParams
    suffix: str | list[int] | None = None


class ServerState:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = engine
        self.hub: Hub | None = None
        self.engine_loop: EngineLoop | None = None
        self.phase = "loading"
        self.load_error: str | None = None
        self.server: Any = None  # a uvicorn.Server to stop if loading fails (set by the CLI)
        self._load_task: asyncio.Task | None = None
        if settings.served_model_name:
            self.model_name = settings.served_model_name
        elif settings.model is not None:
            self.model_name = Path(settings.model).name
        else:
            self.model_name = "marble"

    # ----------------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        if self.engine is not None:
            self._start(self.engine, loop)
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
        self.engine = engine
        self.hub = Hub(self.settings, engine.tokenizer, self.metrics)
        self.engine_loop = EngineLoop(engine, self.metrics, self.hub.deliver)
        self.hub.engine_loop = self.engine_loop
        # What loading left behind (the tokenizer's tables, the model's modules) lives as long
        # as the server: out of the collector's reach, full collections stay short pauses of
        # the event loop instead of walking those objects every time.
        gc.freeze()
        self.engine_loop.start(loop)
        self.phase = "ready"
        log.info("ready: serving %r", self.model_name)

    async def drain(self) -> None:
        """Refuse new work (503 + Retry-After), let running requests finish for up to the
        drain timeout, abort what is left, stop the engine thread.

        The CLI runs it on SIGTERM/SIGINT while the socket still listens (server/drain.py);
        the lifespan runs it again at exit, when it finds nothing left to do."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.phase == "ready":
            self.phase = "draining"
        if self.hub is not None and self.engine_loop is not None:
            if self.hub.routes:
                log.info(
                    "draining: %d running requests get up to %g s to finish",
                    len(self.hub.routes),
                    self.settings.drain_timeout_s,
                )
            try:
                await asyncio.wait_for(self.hub.idle.wait(), self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timeout: aborting %d requests", len(self.hub.routes))
            await self.engine_loop.stop()

    def abort_running(self) -> None:
        """Cut a drain short: every running request ends now, answered 503 `aborted`."""
        if self.hub is not None:
            for group in list(self.hub.groups.values()):
                self.hub.abort(group)

    async def shutdown(self) -> None:
        await self.drain()
        if self.phase != "failed":
            self.phase = "stopped"

    @property
    def defaults(self) -> SamplingParams:
        """The checkpoint's serving defaults; request fields are merged over them."""
        assert self.engine is not None
        return self.engine.defaults

    # -------------------------------------------------------------------------- checks
    def reject(self, status: int, reason: str, message: str, **kw: Any) -> APIError:
        self.metrics.reject(reason)
        return APIError(status, message, **kw)

    def ready_hub(self) -> Hub:
        if self.phase != "ready" or self.hub is None:
            message = {
                "loading": "the model is still loading",
                "draining": "the server is shutting down",
                "failed": f"the model failed to load: {self.load_error}",
            }.get(self.phase, "the server is not ready")
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            raise self.reject(503, "not_ready", message, code="not_ready", headers=retry)
        return self.hub

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise self.reject(
                404,
                "unknown_model",
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_n(self, total: int) -> None:
        if total > self.settings.max_n:
            raise self.reject(
                400, "invalid", f"at most {self.settings.max_n} choices per request", param="n"
            )

    def jobs(self, body: SamplingBody, prompts: list[Any], suffix: Any = None) -> list[Job]:
        """One engine job per prompt and choice (`body.n`), its sampling parameters merged
        over the serving defaults; too many choices or invalid fields are a 400."""
        self.check_n(len(prompts) * body.n)
        return [
            Job(prompt, self.params(lambda j=j: body.to_sampling_params(self.defaults, j)), suffix)
            for prompt in prompts
            for j in range(body.n)
        ]

    def params(self, build: Callable[[], T]) -> T:
        """Run a conversion of the body; its ValueError becomes a 400."""
        try:
            return build()
        except ValueError as exc:
            raise self.invalid(exc) from exc

    def invalid(self, exc: ValueError) -> APIError:
        """400 for an engine-side ValueError; `param` is the field its message starts with."""
        message = str(exc)
        word = message.split(" ", 1)[0]
        param = word if word in SamplingBody.model_fields or word in ("prompt", "suffix") else None
        return self.reject(400, "invalid", message, param=param, code="invalid_value")

    async def submit(self, group: RequestGroup, jobs: list[Job]) -> None:
        """Queue every choice or none: a refusal aborts the ones already queued.

        Tokenizing and validating run in a worker thread (the tokenizer releases the GIL), so
        a long prompt never stalls the event loop; queueing itself is O(1) per choice."""
        hub, engine = self.ready_hub(), self.engine
        assert engine is not None

        def prepare() -> list[EngineRequest]:
            return [
                engine.make_request(job.prompt, job.params, Hub.engine_id(group, i), job.suffix)
                for i, job in enumerate(jobs)
            ]

        try:
            requests = await asyncio.to_thread(prepare)
        except ValueError as exc:
            hub.discard(group)
            raise self.invalid(exc) from exc
        try:
            hub = self.ready_hub()  # the server may have started draining meanwhile
            for job, request in zip(jobs, requests):
                hub.submit(group, request, job.prompt)
        except APIError:
            hub.discard(group)
            raise
        except QueueFullError as exc:
            hub.discard(group)
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            raise self.reject(
                429, "queue_full", f"server busy: {exc}", code="queue_full", headers=retry
            ) from exc
        except ValueError as exc:
            hub.discard(group)
            raise self.invalid(exc) from exc

    async def until_done_or_disconnect(
        self, request: Request, work: Awaitable[T], group: RequestGroup
    ) -> T | Response:
        """Await a non-streaming result; if the client leaves first, abort its request."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        self.client_gone(group)
        return Response(status_code=499)  # nobody is listening

    def client_gone(self, group: RequestGroup) -> None:
        if not group.finished and self.hub is not None:
            self.metrics.disconnects.inc()
            self.hub.abort(group)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
