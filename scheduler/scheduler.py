"""Which requests run this step: bounded waiting queues (one per served model), a running set,
aborts and deadlines.

Admission fills free batch slots within three budgets: batch size, canvas tokens per forward,
and KV cache bytes (each request's known at admission); what can never fit is refused when it
is added. Each free slot goes to the served model with the fewest running requests (ties: the
request that has waited longest), FIFO within a model, so one model's flood cannot starve
another's requests; each model's queue holds at most its share of max_queue. Long requests
(worst-case forwards over `long_forwards`) never take the last `short_slots` slots, so a short
request never waits for a long one to finish.

The only place a request's status changes. Thread-safe (one lock): the server adds and aborts
from the event loop while the engine thread schedules. No torch here.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from marble.scheduler.request import Request, RequestStatus
from marble.scheduler.sampling_params import InvalidParam


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity; the caller should retry later."""


class SharedKV(Protocol):
    """KV bytes held for no running request (spare slots, prefix caches), given up on
    demand."""

    @property
    def nbytes(self) -> int: ...

    def evict(self, nbytes: float) -> int:
        """Free at least `nbytes` where it can; returns the bytes freed."""
        ...

    def claim(self, request: Request) -> int:
        """The KV bytes a request being admitted needs: its `kv_bytes`, less what it reads
        of what is held (pinned for it from now on, `unclaim` if it waits after all)."""
        ...

    def unclaim(self, request: Request) -> None: ...

    def summary(self) -> dict[str, Any]:
        """What the engine's step statistics report of it (`EngineStats` fields)."""
        ...


class NothingShared:
    nbytes = 0

    def evict(self, nbytes: float) -> int:
        return 0

    def claim(self, request: Request) -> int:
        return request.kv_bytes

    def unclaim(self, request: Request) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_queue: int = 256
    # Sum of canvas lengths in one forward (a CFG request counts twice): bounds activation memory.
    max_batch_tokens: int = 32768
    # Bytes of KV cache the running requests may hold together (None: the engine picks one for
    # its device, model/device.py).
    max_kv_bytes: int | None = None
    # A request that may take more forwards than this (Request.max_forwards) is long.
    long_forwards: int = 256
    # Batch slots long requests never take (None: one per 8 of max_batch_size, at least one
    # from a batch of 2): a short request then starts at once beside a batch of long ones.
    short_slots: int | None = None
    # Keep finished prompt blocks for later requests where that is exact (`Family.
    # shares_prefixes`); they count once against max_kv_bytes and yield to requests.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1, max_queue >= 0")
        if self.max_kv_bytes is not None and self.max_kv_bytes < 0:
            raise ValueError("max_kv_bytes must be >= 0")
        if self.long_forwards < 1:
            raise ValueError("long_forwards must be >= 1")
        if self.short_slots is not None and not 0 <= self.short_slots < self.max_batch_size:
            raise ValueError("short_slots must be in [0, max_batch_size)")

    @property
    def reserved_short(self) -> int:
        """Batch slots only short requests take."""
        if self.short_slots is not None:
            return self.short_slots
        return 0 if self.max_batch_size < 2 else max(1, self.max_batch_size // 8)


def request_cost(request: Request) -> int:
    """Tokens a request adds to one forward (CFG runs an unconditional copy too)."""
    return request.canvas_len * (2 if request.params.cfg_scale > 0 else 1)


DEADLINE_EXCEEDED = "deadline_exceeded"  # error_code of a request that ran past its deadline


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: dict[str | None, deque[Request]] = {}  # by served model name
        self.running: list[Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._models = 1  # models served: each one's share of max_queue
        self._num_waiting = 0
        self._arrival: dict[str, int] = {}  # waiting request id -> arrival order
        self._counter = itertools.count()
        self.shared_kv: SharedKV = NothingShared()  # the engine's spare slots, prefix caches
        # The budget's bytes left after the last `schedule` admitted its requests: the room
        # that step's new prefix blocks may take (their caches' `capacity`, set by the engine).
        self.kv_room = self.kv_budget

    def serve_models(self, count: int) -> None:
        """How many models share the waiting queue (each gets ceil(max_queue / count))."""
        with self._lock:
            self._models = max(1, count)

    def is_long(self, request: Request) -> bool:
        return request.max_forwards > self.config.long_forwards

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
        limit = self.config.max_queue
        with self._lock:
            if self._num_waiting >= limit:
                raise QueueFullError(f"waiting queue is full ({limit} requests)")
            queue = self.waiting.setdefault(request.model, deque())
            share = -(-limit // self._models)
            if len(queue) >= share:
                raise QueueFullError(
                    f"model {request.model!r} holds its share of the waiting queue ({share} of "
                    f"{limit} requests)"
                )
            request.status = RequestStatus.WAITING
            queue.append(request)
            self._num_waiting += 1
            self._arrival[request.request_id] = next(self._counter)

    def abort(self, request_id: str) -> None:
        """Mark for removal; takes effect at the next step boundary."""
        with self._lock:
            self._aborts.add(request_id)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """At a step boundary: drop aborted requests, end those past their deadline (status
        error, error_code "deadline_exceeded"), admit waiting ones (module docstring) within
        the batch size and the token and KV budgets. Returns (running, ended)."""
        now = time.monotonic()
        with self._lock:
            every = [r for queue in self.waiting.values() for r in queue] + self.running
            ran = set(map(id, self.running))
            aborted = [r for r in every if r.request_id in self._aborts]
            self._aborts.clear()
            for request in aborted:
                self._finish_locked(request, RequestStatus.FINISHED_ABORTED)
            expired = [r for r in every if not r.is_finished() and _expired(r, now)]
            for request in expired:
                request.error = "the request ran past its deadline (request_timeout_s)"
                request.error_code = DEADLINE_EXCEEDED
                self._finish_locked(request, RequestStatus.FINISHED_ERROR)
            budget = self.config.max_batch_tokens - sum(map(request_cost, self.running))
            # The requests ended now hold their KV until the runners drop them after this call.
            dropping = sum(r.kv_bytes for r in aborted + expired if id(r) in ran)
            kv_free = self.kv_budget - self.kv_reserved - self.shared_kv.nbytes - dropping
            long_slots = self.config.max_batch_size - self.config.reserved_short
            long_running = sum(map(self.is_long, self.running))
            while len(self.running) < self.config.max_batch_size:
                head = self._next_locked(long_running >= long_slots)
                if head is None:
                    break
                need = self.shared_kv.claim(head)
                if need > kv_free:  # kept blocks make room for a request
                    kv_free += self.shared_kv.evict(need - kv_free)
                if request_cost(head) > budget or need > kv_free:
                    self.shared_kv.unclaim(head)
                    break  # a large request waits rather than being overtaken forever
                self._unqueue_locked(head)
                head.kv_bytes = need
                budget -= request_cost(head)
                kv_free -= need
                long_running += self.is_long(head)
                head.status = RequestStatus.RUNNING
                self.running.append(head)
            self.kv_room = kv_free
            return list(self.running), aborted + expired

    def _next_locked(self, long_full: bool) -> Request | None:
        """The request the next free slot goes to: the first admissible one (a short one when
        long requests hold all theirs) of the model running fewest, the longest-waiting on a
        tie."""
        running = Counter(r.model for r in self.running)
        best, best_key = None, None
        for model, queue in self.waiting.items():
            head = next((r for r in queue if not (long_full and self.is_long(r))), None)
            if head is None:
                continue
            key = (running[model], self._arrival[head.request_id])
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def _unqueue_locked(self, request: Request) -> None:
        self.waiting[request.model].remove(request)
        self._num_waiting -= 1
        self._arrival.pop(request.request_id, None)

    def finish(self, request: Request, status: RequestStatus) -> None:
        with self._lock:
            self._finish_locked(request, status)

    def _finish_locked(self, request: Request, status: RequestStatus) -> None:
        if not status.finished:
            raise ValueError(f"{status} is not a final status")
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting.get(request.model, ()):
            self._unqueue_locked(request)
        request.status = status

    @property
    def kv_reserved(self) -> int:
        """KV bytes admitted: what the running requests hold or will at their next step."""
        return sum(r.kv_bytes for r in self.running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._num_waiting or self.running or self._aborts)


def _expired(request: Request, now: float) -> bool:
    return request.deadline is not None and now >= request.deadline
