"""The engine thread: runs `Engine.step()` while there is work and hands each step's outputs
to the event loop with one `loop.call_soon_threadsafe` per step.

Owns the thread's lifecycle (start, stop) and per-request timings. Only async_engine.py calls
it. The event loop never runs the model; this module knows nothing of HTTP, SSE or OpenAI
shapes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.request import Request
from marble.server.metrics import Delivery, Metrics, Timing

log = logging.getLogger(__name__)


class EngineThread:
    """One thread drives the engine; `submit`/`abort` are called from the event loop."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        idle_wait_s: float = 1.0,
        request_timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.deliver = deliver  # runs on the event loop with each step's outputs
        self.idle_wait_s = idle_wait_s
        # Each request's deadline, from its submission (None or 0: none).
        self.request_timeout_s = request_timeout_s or None
        self.timings: dict[str, Timing] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = False
        self._failed: set[str] = set()  # failed by `_fail_all`; their later outputs are dropped

    # ---------------------------------------------------------------------- event loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="marble-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue one engine request (built by `Engine.make_request`). Raises ValueError or
        QueueFullError (nothing is queued then)."""
        submitted = time.monotonic()
        if self.request_timeout_s is not None:
            request.deadline = submitted + self.request_timeout_s
        self.timings[request.request_id] = Timing(submitted=submitted)
        try:
            self.engine.add(request)
        except BaseException:
            self.timings.pop(request.request_id, None)
            raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, let the thread deliver those final outputs, then join it."""
        for request_id in list(self.timings):
            self.engine.abort(request_id)
        deadline = time.monotonic() + timeout
        while self.timings and self.alive and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        log.info("engine thread started")
        while not self._stop:
            self._wake.clear()  # before the check, so a submit racing with it is not lost
            if not self.engine.has_unfinished():
                self.metrics.idle(self.engine.scheduler.num_waiting)
                self._wake.wait(self.idle_wait_s)
                continue
            start = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # an engine bug: fail what is in flight, keep serving
                log.exception("engine step failed; failing requests %s", list(self.timings))
                outputs = self._fail_all(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)  # do not spin if every step keeps failing
            now = time.monotonic()
            delivery: Delivery = []
            for out in outputs:
                if out.request_id in self._failed and out.error is None:
                    if out.finished:
                        self._failed.discard(out.request_id)
                    continue
                timing = self.timings.get(out.request_id)
                if out.finished:
                    self.timings.pop(out.request_id, None)
                delivery.append((out, timing))
            try:
                self.metrics.observe_step(self.engine.last_stats, start, now, delivery)
            except Exception:  # a metrics bug must not cost the outputs or the thread
                log.exception("recording a step's metrics failed; its outputs go on")
            if delivery:
                self._hand_over(delivery)
        log.info("engine thread stopped")

    def _hand_over(self, delivery: Delivery) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.deliver, delivery)
        except RuntimeError:  # the loop closed between the check and the call
            log.warning("event loop closed; dropped outputs of %d requests", len(delivery))

    def _fail_all(self, message: str) -> list[StepOutput]:
        """Synthesise an error output for every request in flight and abort it in the engine
        (its later abort output is ignored: the request has already finished for us)."""
        failed = []
        for request_id in list(self.timings):
            self.engine.abort(request_id)
            self._failed.add(request_id)
            failed.append(
                StepOutput(
                    request_id=request_id,
                    step=0,
                    total_steps=None,
                    block_index=0,
                    num_blocks=0,
                    committed=[],
                    num_masked=0,
                    tokens=[],
                    text="",
                    finished=True,
                    finish_reason="error",
                    error=message,
                    error_code="engine_error",
                )
            )
        return failed
