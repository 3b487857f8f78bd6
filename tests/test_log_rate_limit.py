"""The repeated-line limiter (server/log_rate_limit.py): an identical line passes a few times per
interval, the rest are counted and reported, different lines are independent; and asyncio's
accept-failure flood, logged through its exception handler, is held to a few lines."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import socket

from marble.server.log_rate_limit import RepeatLimiter, limit_repeats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logger_with_limiter(
    name: str, clock: Clock, burst: int = 3, interval_s: float = 10.0
) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RepeatLimiter(handler, burst, interval_s, clock))
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_an_identical_line_passes_burst_times_then_is_counted():
    clock = Clock()
    log, out = logger_with_limiter("test.rate.identical", clock)
    for _ in range(1000):
        log.error("socket.accept() out of system resource")
    assert out.getvalue().count("out of system resource") == 3
    clock.now = 10.5
    log.error("socket.accept() out of system resource")
    lines = out.getvalue().splitlines()
    summary = [line for line in lines if "997" in line]
    assert len(summary) == 1 and "out of system resource" in summary[0]
    assert lines[-1] == "socket.accept() out of system resource"  # a new window lets it in


def test_different_lines_are_limited_separately():
    clock = Clock()
    log, out = logger_with_limiter("test.rate.different", clock)
    for i in range(100):
        log.warning("request %d failed", i)  # a different line each time
        log.warning("same")
    text = out.getvalue()
    assert all(f"request {i} failed" in text for i in range(100))
    assert text.count("same") == 3


def test_the_summary_comes_when_anything_is_logged_after_the_interval():
    clock = Clock()
    log, out = logger_with_limiter("test.rate.summary", clock)
    for _ in range(50):
        log.info("flood")
    clock.now = 11.0
    log.info("something else")
    assert "47" in out.getvalue()


def test_asyncio_accept_failures_are_held_to_a_few_lines():
    """asyncio (3.11) logs each EMFILE from accept() once per pass of its accept loop, up to
    `backlog` times: here the same failure through the installed limiter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        limit_repeats(burst=5, interval_s=60.0)
        loop = asyncio.new_event_loop()
        try:
            with socket.socket() as sock:
                for _ in range(2000):
                    loop.call_exception_handler(
                        {
                            "message": "socket.accept() out of system resource",
                            "exception": OSError(errno.EMFILE, "Too many open files"),
                            "socket": sock,
                        }
                    )
        finally:
            loop.close()
    finally:
        root.removeHandler(handler)
        _remove_limiters()
    assert 1 <= out.getvalue().count("socket.accept() out of system resource") <= 5
    assert len(out.getvalue()) < 10_000


def _remove_limiters() -> None:
    """`limit_repeats` filtered every handler in this process: leave the others as they were."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            for limiter in [f for f in handler.filters if isinstance(f, RepeatLimiter)]:
                handler.removeFilter(limiter)
