"""Process-level behaviour of `python -m marble.server`: the drain on SIGTERM and SIGINT (README,
"Server") and secrets kept out of its logs. Each test owns its server process."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server

pytestmark = pytest.mark.e2e

# The whole context of the tiny checkpoint (max_sequence_length 512) less a short prompt, one
# token per forward: seconds of work on any CPU, so the drain is seen while it runs.
LONG = {
    "prompt": "Hello",
    "max_tokens": 500,
    "steps": 500,
    "block_length": 4,
    "ignore_eos": True,
    "temperature": 0,
}
SHORT = {"prompt": "Hi", "max_tokens": 4, "steps": 4}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll `condition` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)  # polling a condition, not waiting a fixed time
    raise TimeoutError(f"no {what} after {timeout} s")


def start_long_request(url: str) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    """POST the long completion from a thread; return once the server says it is running."""
    result: dict[str, httpx.Response] = {}

    def post() -> None:
        result["response"] = httpx.post(f"{url}/v1/completions", json=LONG, timeout=180)

    worker = threading.Thread(target=post)
    worker.start()

    def running() -> bool:
        r = httpx.get(f"{url}/health", timeout=5)
        return r.status_code == 200 and r.json()["active_requests"] >= 1

    wait_for(running, "running request")
    return worker, result


def draining_health(url: str) -> httpx.Response:
    def draining() -> httpx.Response | None:
        r = httpx.get(f"{url}/health", timeout=5)
        return r if r.status_code == 503 else None

    return wait_for(draining, "503 from /health")


def output_after_exit(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out.decode()


@pytest.fixture
def slow_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain timeout no slow CPU reaches before the long request is done."""
    monkeypatch.setenv("MARBLE_DRAIN_TIMEOUT_S", "150")


def test_sigterm_drains_then_exits_zero(llada_tiny_path: Path, slow_drain: None):
    proc, url = start_server(llada_tiny_path)
    try:
        worker, result = start_long_request(url)
        proc.send_signal(signal.SIGTERM)

        health = draining_health(url)
        assert health.json()["status"] == "draining"
        assert health.headers["retry-after"].isdigit()

        refused = httpx.post(f"{url}/v1/completions", json=SHORT, timeout=5)
        assert refused.status_code == 503
        assert refused.headers["retry-after"].isdigit()
        error = refused.json()["error"]
        assert error["code"] == "not_ready" and error["message"] and "type" in error

        worker.join(180)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]

        out = output_after_exit(proc)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_sigint_drains_a_second_aborts_and_no_traceback(llada_tiny_path: Path, slow_drain: None):
    proc, url = start_server(llada_tiny_path, "--log-level", "info")
    try:
        worker, result = start_long_request(url)
        proc.send_signal(signal.SIGINT)
        assert draining_health(url).json()["status"] == "draining"
        proc.send_signal(signal.SIGINT)  # do not wait for the running request

        worker.join(180)
        response = result["response"]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "aborted"
        out = output_after_exit(proc)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_api_key_in_a_query_never_reaches_the_log(llada_tiny_path: Path):
    secret = "SECRET-d1ff-usion"
    proc, url = start_server(llada_tiny_path, "--api-key", secret, "--log-level", "info")
    try:
        # Refused (a wrong key) and accepted (the dashboard's EventSource auth): both logged.
        wrong = httpx.get(f"{url}/v1/models", params={"api_key": secret + "x"}, timeout=5)
        assert wrong.status_code == 401
        right = httpx.get(f"{url}/v1/models", params={"api_key": secret, "x": "1"}, timeout=5)
        assert right.status_code == 200 and right.json()["data"]
        proc.send_signal(signal.SIGTERM)
        out = output_after_exit(proc)
    finally:
        if proc.poll() is None:
            stop_server(proc)
    assert '"GET /v1/models?api_key=***&x=1 HTTP/1.1" 200' in out, out  # the rest is kept
    assert secret not in out, out
