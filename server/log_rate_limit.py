"""Keeps one repeated log line from flooding the log: an identical message (same logger, level
and text) passes `burst` times per `interval_s`, the rest are counted, and once the interval
is over one line says how many were left out. asyncio's "socket.accept() out of system
resource", logged in a tight loop when descriptors run out, is what this is for.
Knows nothing of who logs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

BURST = 5
INTERVAL_S = 10.0
# Distinct messages tracked at once: a flood of different lines must not grow memory.
MAX_KEYS = 1024
# Loggers whose lines are one per served request, each with its own client address: uvicorn's
# access formatter also cannot format a summary line (it unpacks the record's arguments).
EXEMPT = ("uvicorn.access",)

_Key = tuple[str, int, str]


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0


class RepeatLimiter(logging.Filter):
    """A filter for one handler (the summaries go to that handler)."""

    def __init__(
        self,
        handler: logging.Handler,
        burst: int = BURST,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._windows: OrderedDict[_Key, _Window] = OrderedDict()  # oldest window first
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "repeats_suppressed"):
            return True  # a summary this filter made
        try:
            text = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as it always has
            return True
        key = (record.name, record.levelno, text)
        now = self.clock()
        with self._lock:
            summaries = self._close_windows(now)
            window = self._windows.get(key)
            if window is None:
                if len(self._windows) >= MAX_KEYS:
                    summaries += self._summaries([self._windows.popitem(last=False)])
                window = self._windows[key] = _Window(now)
            allowed = window.passed < self.burst
            if allowed:
                window.passed += 1
            else:
                window.suppressed += 1
        for summary in summaries:
            self.handler.handle(summary)
        return allowed

    def _close_windows(self, now: float) -> list[logging.LogRecord]:
        ended = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.start < self.interval_s:
                break
            ended.append(self._windows.popitem(last=False))
        return self._summaries(ended)

    def _summaries(self, ended: list[tuple[_Key, _Window]]) -> list[logging.LogRecord]:
        return [
            logging.makeLogRecord(
                {
                    "name": name,
                    "levelno": level,
                    "levelname": logging.getLevelName(level),
                    "msg": "%d more identical lines in %g s were left out: %s",
                    "args": (window.suppressed, self.interval_s, message),
                    "repeats_suppressed": window.suppressed,
                }
            )
            for (name, level, message), window in ended
            if window.suppressed
        ]


def limit_repeats(burst: int = BURST, interval_s: float = INTERVAL_S) -> None:
    """Give every handler configured so far its own limiter (call it after uvicorn configures
    its handlers); the access log's handlers are left alone (see EXEMPT)."""
    loggers = {"": logging.getLogger(), **logging.Logger.manager.loggerDict}
    for name, logger in loggers.items():
        if name in EXEMPT:
            continue
        for handler in getattr(logger, "handlers", []):  # placeholders have none
            if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
                handler.addFilter(RepeatLimiter(handler, burst, interval_s))
