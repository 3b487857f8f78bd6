"""Connections are bounded (server/connection_guard.py) in a real `python -m marble.server`
under a 1024-descriptor limit (systemd's default): 1,100 idle sockets leave `/health` and new
work answered and the log small, and a request trickled a byte at a time is cut off at the
header deadline. Each test owns its server process; every socket is closed at the end."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, stop_server

pytestmark = pytest.mark.e2e

NOFILE = 1024
IDLE_SOCKETS = 1100


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@contextmanager
def limited_server(model: Path, log: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """The server with RLIMIT_NOFILE 1024 (util-linux prlimit where there is one), its output
    in `log`; yields once `/health` says 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "marble.server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "info", *flags]
    prlimit = shutil.which("prlimit")
    if prlimit:
        cmd = [prlimit, f"--nofile={NOFILE}:{NOFILE}", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=None if prlimit else _limit_descriptors,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)  # polling the readiness condition
        yield url, port
    finally:
        stop_server(proc)


def _room_for_clients(count: int) -> None:
    """This process holds the idle sockets: raise its own soft limit, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"this process may open only {hard} descriptors, {needed} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_idle_sockets_past_the_descriptor_limit_leave_the_server_answering(
    llada_tiny_path: Path, tmp_path: Path
):
    _room_for_clients(IDLE_SOCKETS)
    log = tmp_path / "server.log"
    with limited_server(llada_tiny_path, log) as (url, port), ExitStack() as sockets:
        logged_before = log.stat().st_size
        deadline = time.monotonic() + 60
        for _ in range(IDLE_SOCKETS):
            s = sockets.enter_context(socket.socket())
            s.settimeout(2.0)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:  # a full accept queue: the kernel dropped the SYN too often
                pass
            assert time.monotonic() < deadline, "opening the idle sockets took too long"
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=5.0)
        assert health.status_code == 200
        assert time.monotonic() - started < 5.0
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 4, "steps": 4},
            timeout=30.0,
        )
        assert completion.status_code in (200, 503)
        if completion.status_code == 503:
            assert "error" in completion.json()
        assert log.stat().st_size - logged_before < 1024 * 1024


def test_a_request_trickled_a_byte_every_half_second_is_closed_at_the_header_deadline(
    llada_tiny_path: Path, tmp_path: Path
):
    timeout_s = 1.5
    log = tmp_path / "server.log"
    with limited_server(llada_tiny_path, log, "--header-timeout-s", str(timeout_s)) as (_, port):
        request = b"GET /health HTTP/1.1\r\nHost: m\r\nX-Pad: " + b"a" * 64 + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
            start = time.monotonic()
            closed_after = None
            for byte in request:  # 40 s for the whole request at this pace
                try:
                    s.sendall(bytes([byte]))
                    s.settimeout(0.5)
                    if s.recv(65536) is not None:  # anything (the 408) or EOF: closed
                        closed_after = time.monotonic() - start
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - start
                    break
        assert closed_after is not None, "the trickled request was never cut off"
        assert 0.9 * timeout_s <= closed_after < timeout_s + 5
