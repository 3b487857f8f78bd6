"""Which requests run this step: a bounded waiting queue, a running set, and aborts.

Admission is FIFO within three budgets: batch size, canvas tokens per forward, and KV cache
bytes (each request's known at admission); what can never fit is refused when it is added.

The only place a request's status changes. Thread-safe (one lock): the server adds and aborts
from the event loop while the engine thread schedules. No torch here.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from marble.scheduler.request import Request, RequestStatus
from marble.scheduler.sampling_params import InvalidParam


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity; the caller should retry later."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_queue: int = 256
    # Sum of canvas lengths in one forward (a CFG request counts twice): bounds activation memory.
    max_batch_tokens: int = 32768
    # Bytes of KV cache the running requests may hold together (None: the engine picks one for
    # its device, model/device.py).
    max_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1, max_queue >= 0")
        if self.max_kv_bytes is not None and self.max_kv_bytes < 0:
            raise ValueError("max_kv_bytes must be >= 0")


def request_cost(request: Request) -> int:
    """Tokens a request adds to one forward (CFG runs an unconditional copy too)."""
    return request.canvas_len * (2 if request.params.cfg_scale > 0 else 1)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()

    @property
    def kv_budget(self) -> float:
        """None configured: no limit here (the engine always sets one for its device)."""
        limit = self.config.max_kv_bytes
        return float("inf") if limit is None else limit

    def add(self, request: Request) -> None:
        """Queue a request; raises QueueFullError when full, ValueError when it can never fit."""
        if request_cost(request) > self.config.max_batch_tokens:
            raise ValueError(
                f"request needs {request_cost(request)} tokens per forward, more than "
                f"max_batch_tokens={self.config.max_batch_tokens}"
            )
        if request.kv_bytes > self.kv_budget:
            raise InvalidParam(
                "cache",
                f"request needs {request.kv_bytes} bytes of KV cache, more than the server's "
                f"KV budget of {self.kv_budget:.0f} bytes (send cache: none, or fewer tokens)",
            )
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
            request.status = RequestStatus.WAITING
            self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Mark for removal; takes effect at the next step boundary."""
        with self._lock:
            self._aborts.add(request_id)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """At a step boundary: drop aborted requests, admit waiting ones FIFO within the batch
        size and token budget. Returns (running, aborted)."""
        with self._lock:
            aborted = [r for r in (*self.waiting, *self.running) if r.request_id in self._aborts]
            self._aborts.clear()
            for request in aborted:
                self._finish_locked(request, RequestStatus.FINISHED_ABORTED)
            budget = self.config.max_batch_tokens - sum(map(request_cost, self.running))
            kv_free = self.kv_budget - self.kv_reserved
            while self.waiting and len(self.running) < self.config.max_batch_size:
                head = self.waiting[0]
                if request_cost(head) > budget or head.kv_bytes > kv_free:
                    break  # FIFO: a large request waits rather than being overtaken forever
                request = self.waiting.popleft()
                budget -= request_cost(request)
                kv_free -= request.kv_bytes
                request.status = RequestStatus.RUNNING
                self.running.append(request)
            return list(self.running), aborted

    def finish(self, request: Request, status: RequestStatus) -> None:
        with self._lock:
            self._finish_locked(request, status)

    def _finish_locked(self, request: Request, status: RequestStatus) -> None:
        if not status.finished:
            raise ValueError(f"{status} is not a final status")
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status

    @property
    def kv_reserved(self) -> int:
        """KV bytes admitted: what the running requests hold or will at their next step."""
        return sum(r.kv_bytes for r in self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._aborts)
