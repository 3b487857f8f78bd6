"""A real `marble serve` on 127.0.0.1 for the scripts in this folder: started, ready once
`/health` says 200, stopped (SIGTERM, so it drains) when the block ends.

    with local_server(["--model", path]) as (base_url, proc):
        ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server was not ready after {timeout_s:g} s")


@contextmanager
def local_server(
    flags: list[str],
    *,
    port: int | None = None,
    command: list[str] | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    output: IO | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`command` replaces `python -m marble.server` (e.g. an older checkout's own entry
    point); `output` takes the server's stdout and stderr (default: this process's)."""
    port = port or free_port()
    cmd = [*(command or [sys.executable, "-m", "marble.server"])]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        preexec_fn=preexec_fn,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
