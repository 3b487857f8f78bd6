"""Idle sockets under a 1024-descriptor limit: does the server keep answering?

Starts a real `python -m marble.server` on 127.0.0.1 with RLIMIT_NOFILE set to `--nofile`
(systemd's default is 1024), opens `--sockets` TCP connections that never send a byte, and
meanwhile polls `/health`. Then it sends `--completions` completions and keeps the flood up for
`--seconds`. Printed: /health latency p50/p99/max and failures during the flood, the statuses of
the completions, the bytes the server logged, the server's peak descriptor count, and how many
of the idle sockets the server still holds at the end and how many it closed or refused.
The targets: /health answers throughout, each completion gets 200 or 503, under 1 MB of log.
Loopback only; every phase is bounded and every socket is closed at the end.

    python benchmarks/idle_sockets.py                      # 1,100 sockets, 1024 descriptors
    python benchmarks/idle_sockets.py --sockets 3000 --seconds 20 -- --header-timeout-s 2
    mkdir -p /tmp/head/marble && git archive HEAD | tar -x -C /tmp/head/marble
    python benchmarks/idle_sockets.py --pythonpath /tmp/head      # the committed version
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from local_server import free_port, local_server

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "llada-tiny"
COMPLETION = {"prompt": "Hi", "max_tokens": 4, "steps": 4}


def limit_descriptors(nofile: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return apply


def raise_own_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def request(port: int, method: str, path: str, body: dict | None, timeout: float) -> int | str:
    """The status, or the name of the error that stood in for one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"content-type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def open_idle(port: int, count: int, stop: threading.Event) -> tuple[list[socket.socket], int]:
    """`count` connections that never send; (the open ones, how many could not connect)."""
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(count):
        if stop.is_set():
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            s.close()
            failed += 1
    return socks, failed


def still_open(s: socket.socket) -> bool:
    """False once the server closed its side (EOF, a reset or a 503 waiting to be read)."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    return False


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=TINY)
    parser.add_argument("--sockets", type=int, default=1100)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--completions", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the flood lasts")
    parser.add_argument(
        "--pythonpath",
        type=Path,
        help="a folder holding another checkout as marble/ (e.g. from `git archive HEAD`), "
        "to measure that one instead",
    )
    parser.add_argument("--keep-log", action="store_true", help="leave the server's log file")
    parser.add_argument("server_flags", nargs="*", help="more `marble serve` flags, after --")
    args = parser.parse_args()
    raise_own_limit(args.sockets + 256)

    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="marble-idle-", suffix=".log", delete=False)
    flags = ["--model", str(args.model), "--log-level", "info", *args.server_flags]
    env = None if args.pythonpath is None else {"PYTHONPATH": str(args.pythonpath)}
    with local_server(
        flags,
        port=port,
        output=log_file,
        env=env,
        preexec_fn=limit_descriptors(args.nofile),
    ) as (_, proc):
        log_before = os.path.getsize(log_file.name)
        fds_before = descriptors(proc.pid)
        stop = threading.Event()
        health: list[tuple[float, int | str]] = []
        peak_fds = [fds_before]

        def probe() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                status = request(port, "GET", "/health", None, timeout=5.0)
                health.append((time.perf_counter() - start, status))
                peak_fds[0] = max(peak_fds[0], descriptors(proc.pid))
                stop.wait(0.05)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        started = time.monotonic()
        socks, failed = open_idle(port, args.sockets, stop)
        opened_s = time.monotonic() - started
        completions = [
            request(port, "POST", "/v1/completions", COMPLETION, timeout=10.0)
            for _ in range(args.completions)
        ]
        stop.wait(max(0.0, args.seconds - (time.monotonic() - started)))
        held = sum(still_open(s) for s in socks)
        stop.set()
        prober.join(timeout=10)
        for s in socks:
            s.close()
        log_bytes = os.path.getsize(log_file.name) - log_before

    ok = sorted(t * 1000 for t, status in health if status == 200)
    bad = [status for _, status in health if status != 200]
    print(f"server: RLIMIT_NOFILE {args.nofile}, {fds_before} descriptors open before the flood")
    print(f"idle sockets: {len(socks)} connected in {opened_s:.2f} s, {failed} failed to connect")
    print(f"  still held by the server after {args.seconds:g} s: {held}")
    print(f"  closed or refused by the server: {len(socks) - held}")
    print(f"server descriptors, peak seen: {peak_fds[0]}")
    if ok:
        p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
        print(
            f"/health: {len(ok)} x 200, p50 {statistics.median(ok):.1f} ms, p99 {p99:.1f} ms, "
            f"max {ok[-1]:.1f} ms; {len(bad)} failed {sorted(set(map(str, bad)))}"
        )
    else:
        print(f"/health: never answered 200; {len(bad)} failed {sorted(set(map(str, bad)))}")
    print(f"completions during the flood: {completions}")
    print(f"server log during the flood: {log_bytes:,} bytes ({log_file.name})")
    caps = [line for line in Path(log_file.name).read_text().splitlines() if "keeping at" in line]
    print(f"connection cap: {caps[0].split(': ', 1)[1] if caps else 'none logged'}")
    if not args.keep_log:
        os.unlink(log_file.name)


if __name__ == "__main__":
    sys.exit(main())
