"""A real `python -m marble.server` on 127.0.0.1 and a free port, ready when `/health` says so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "e2e-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path | None, *flags: str, timeout: float = 120.0
) -> tuple[subprocess.Popen, str]:
    """Start `python -m marble.server` (on `model`; None: the embedded model, as `marble serve`
    names it) and return once `/health` is 200 (the caller stops it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "marble.server", "--host", "127.0.0.1"]
    cmd += [] if model is None else ["--model", str(model)]
    cmd += ["--port", str(port), "--log-level", "warning", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise TimeoutError(f"server on {url} not ready after {timeout} s")
        time.sleep(0.05)  # polling the readiness condition, not waiting a fixed time


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_server(model: Path | None, *flags: str, timeout: float = 120.0) -> Iterator[str]:
    proc, url = start_server(model, *flags, timeout=timeout)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def server_url(llada_tiny_path: Path) -> Iterator[str]:
    """Tiny LLaDA behind an API key."""
    with running_server(llada_tiny_path, "--api-key", API_KEY) as url:
        yield url


@pytest.fixture(scope="session")
def full_server_url(llada_tiny_path: Path) -> Iterator[str]:
    """A server whose waiting queue holds nothing: every request is refused with 429."""
    with running_server(llada_tiny_path, "--max-queue", "0") as url:
        yield url
