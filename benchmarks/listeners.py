"""Slow listeners: server memory and /health latency while dashboards never read.

Starts a real `python -m marble.server` on 127.0.0.1, opens N raw TCP connections to
`GET /v1/diffusion/events` that never read (a tiny receive buffer, so the server's side fills
up), runs G concurrent generations (`POST /v1/completions`) for a while and times `/health`
meanwhile. Printed: the server's RSS before the listeners, at the end of the traffic and after
the listeners close, the /health p50/p99/max, the server-side connections still open and the
bytes the kernel holds in their send queues, and `marble_open_streams` from /metrics. The
targets: /health p99 < 50 ms, RSS after close back near its start, no stalled connection left
once `MARBLE_SEND_TIMEOUT_S` has passed (`--stall-wait`). Loopback only; every phase is bounded.

    python benchmarks/listeners.py                         # 300 listeners, 8 generations
    python benchmarks/listeners.py --listeners 50 --seconds 10 --send-timeout 5 --stall-wait 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_server import free_port, local_server

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_connections(port: int) -> tuple[int, int]:
    """(established server-side sockets on `port`, bytes queued in their kernel send buffers)."""
    count = queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                count += 1
                queued += int(queues.split(":")[0], 16)
    return count, queued


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def open_streams(port: int) -> dict[str, float]:
    """`marble_open_streams` by kind (empty on a server without the gauge)."""
    _, body = get(port, "/metrics")
    found = re.findall(r'^marble_open_streams\{kind="(\w+)"\} (\S+)$', body.decode(), re.M)
    return {kind: float(value) for kind, value in found}


def listener(port: int, rcvbuf: int) -> socket.socket:
    """A dashboard connection that sends its request and then never reads."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(
        b"GET /v1/diffusion/events HTTP/1.1\r\nHost: marble\r\nAccept: text/event-stream\r\n\r\n"
    )
    return s


def complete(port: int, body: dict) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        response.read()
        return response.status == 200
    finally:
        conn.close()


def generations(port: int, body: dict, stop: threading.Event, done: list[bool]) -> None:
    while not stop.is_set():
        # One append per request (atomic): `done[0] += complete()` would read the count
        # before the request and lose every other thread's updates meanwhile.
        done.append(complete(port, body))


def measure(args: argparse.Namespace, port: int, proc: subprocess.Popen) -> None:
    """Warm up, open the listeners, run the traffic and print every figure."""
    socks: list[socket.socket] = []
    try:
        body = {"prompt": "def add(a, b):", "max_tokens": args.max_tokens, "ignore_eos": True}
        # Warm up with one full batch, so the engine's own working memory is in the baseline.
        warm = [
            threading.Thread(target=complete, args=(port, body)) for _ in range(args.generations)
        ]
        for w in warm:
            w.start()
        for w in warm:
            w.join(timeout=300)
        rss_start = rss_mb(proc.pid)

        socks = [listener(port, args.rcvbuf) for _ in range(args.listeners)]
        # The clock starts once the server has taken every listener in (its gauge says so).
        deadline = time.monotonic() + 60
        while open_streams(port).get("dashboard", args.listeners) < args.listeners:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not take every listener in within 60 s")
            time.sleep(0.1)
        stop, done = threading.Event(), []
        workers = [
            threading.Thread(target=generations, args=(port, body, stop, done), daemon=True)
            for _ in range(args.generations)
        ]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        health_ms: list[float] = []
        offsets: list[float] = []
        peak = rss_start
        interval = args.seconds / args.health_calls
        while len(health_ms) < args.health_calls:
            start = time.perf_counter()
            status, _ = get(port, "/health")
            health_ms.append((time.perf_counter() - start) * 1000)
            offsets.append(start - t0)
            if status != 200:
                raise SystemExit(f"/health answered {status}")
            peak = max(peak, rss_mb(proc.pid))
            time.sleep(max(0.0, t0 + len(health_ms) * interval - time.monotonic()))
        stop.set()
        for w in workers:
            w.join(timeout=120)
        rss_during = rss_mb(proc.pid)
        conns_during, queued_during = server_connections(port)
        streams_during = open_streams(port)

        if args.stall_wait:
            time.sleep(args.stall_wait)
        conns_stall, queued_stall = server_connections(port)
        streams_stall = open_streams(port)
        for s in socks:
            s.close()
        socks = []
        deadline = time.monotonic() + 10
        while server_connections(port)[0] > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        rss_after = rss_mb(proc.pid)
        conns_after, queued_after = server_connections(port)
        streams_after = open_streams(port)

        q = statistics.quantiles(health_ms, n=100)
        print(
            f"{args.listeners} idle listeners (SO_RCVBUF {args.rcvbuf}), "
            f"{args.generations} concurrent generations for {args.seconds:.0f} s "
            f"({sum(done)} completed, {len(done) - sum(done)} failed, max_tokens {args.max_tokens})"
        )
        print(
            f"/health over {len(health_ms)} calls: p50 {q[49]:.1f} ms  p99 {q[98]:.1f} ms  "
            f"max {max(health_ms):.1f} ms  (target p99 < 50 ms); slowest at "
            + ", ".join(
                f"{offsets[i]:.1f} s"
                for i in sorted(range(len(health_ms)), key=health_ms.__getitem__)[-3:]
            )
        )
        print(
            f"server RSS: start {rss_start:.0f} MB  peak {peak:.0f} MB  "
            f"end of traffic {rss_during:.0f} MB  after close {rss_after:.0f} MB"
        )
        print(
            f"server-side connections (kernel send queue): end of traffic {conns_during} "
            f"({queued_during / 1e6:.1f} MB)  after stall wait {args.stall_wait:.0f} s "
            f"{conns_stall} ({queued_stall / 1e6:.1f} MB)  after close {conns_after} "
            f"({queued_after / 1e6:.1f} MB)"
        )
        print(
            f"marble_open_streams: end of traffic {streams_during or 'n/a'}  "
            f"after stall wait {streams_stall or 'n/a'}  after close {streams_after or 'n/a'}"
        )
    finally:
        for s in socks:
            s.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "model/default/checkpoint"))
    parser.add_argument("--listeners", type=int, default=300, help="idle dashboard listeners")
    parser.add_argument("--generations", type=int, default=8, help="concurrent generations")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="generation traffic time")
    parser.add_argument("--health-calls", type=int, default=200)
    parser.add_argument("--rcvbuf", type=int, default=4096, help="listeners' SO_RCVBUF")
    parser.add_argument("--send-timeout", type=float, help="server's MARBLE_SEND_TIMEOUT_S")
    parser.add_argument("--torch-threads", type=int, help="server's --torch-threads")
    parser.add_argument(
        "--stall-wait", type=float, default=0.0, help="seconds to keep listeners open after"
    )
    args = parser.parse_args()
    if not 1 <= args.listeners <= 1000 or not 0 < args.seconds <= 300:
        parser.error("--listeners must be 1..1000 and --seconds 0..300")

    port = free_port()
    env = {"PYTHONUNBUFFERED": "1"}
    if args.send_timeout is not None:
        env["MARBLE_SEND_TIMEOUT_S"] = str(args.send_timeout)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="marble-listeners-")
    flags = ["--model", args.model, "--log-level", "warning"]
    if args.torch_threads:
        flags += ["--torch-threads", str(args.torch_threads)]
    try:
        with local_server(flags, port=port, env=env, output=log) as (_, proc):
            measure(args, port, proc)
    except BaseException:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
