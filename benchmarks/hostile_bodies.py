"""Hostile bodies: /health latency and server memory while large invalid bodies are refused.

Starts a real `python -m marble.server` on 127.0.0.1 (the tiny LLaDA reference, else the
embedded model), then sends four ~3.9 MB invalid bodies at once, each under the 4 MiB body
limit, while a thread polls `/health`. Shapes: `[[1]] * 975k` as the prompt, a million `{}`,
`"a"` or `-1` items, a chat of 100k+ messages. Printed: /health p50/p99/max during the attack,
each refusal's status and latency, and the server's RSS before, at its peak and after. The
targets: /health p99 < 50 ms, RSS after within 50 MB of before. Loopback only; bounded.

    python benchmarks/hostile_bodies.py
    python benchmarks/hostile_bodies.py --rounds 3 --server-path /tmp/old   # an older checkout
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

from local_server import free_port, local_server

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "reference" / "llada-tiny"
EMBEDDED = ROOT / "model" / "default" / "checkpoint"


def bodies() -> dict[str, tuple[str, bytes]]:
    """Name -> (path, body): each ~3-4 MB, each invalid."""
    chat = [{"role": "user", "content": "a"}] * 110_000 + [{"role": "nobody"}]
    shapes = {
        "[[1]]*975k": ("/v1/completions", {"prompt": [[1]] * 975_000, "max_tokens": 8}),
        "{}*1M": ("/v1/completions", {"prompt": [{}] * 1_000_000}),
        '"a"*1M': ("/v1/completions", {"prompt": ["a"] * 1_000_000}),
        "-1*1M": ("/v1/diffusion/generate", {"prompt": [-1] * 1_000_000}),
        "chat 110k": ("/v1/chat/completions", {"messages": chat}),
    }
    return {
        name: (path, json.dumps(body, separators=(",", ":")).encode())
        for name, (path, body) in shapes.items()
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(port: int, path: str, body: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    finally:
        conn.close()


def poll_health(port: int, stop: threading.Event, latencies: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        start = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        latencies.append(time.perf_counter() - start)
        time.sleep(0.005)
    conn.close()


def attack(port: int, pid: int, chosen: list[tuple[str, str, bytes]]) -> dict:
    """Send `chosen` at once while polling /health; RSS sampled throughout."""
    latencies: list[float] = []
    results: dict[str, tuple[int, float]] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(port, stop, latencies))
    peak = [rss_mb(pid)]

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.01)

    def send(name: str, path: str, body: bytes) -> None:
        results[name] = post(port, path, body)

    sampler = threading.Thread(target=sample)
    poller.start()
    sampler.start()
    time.sleep(0.2)  # /health's quiet baseline is in the figures too
    senders = [threading.Thread(target=send, args=item) for item in chosen]
    for s in senders:
        s.start()
    for s in senders:
        s.join(timeout=300)
    time.sleep(0.2)
    stop.set()
    poller.join(timeout=60)
    sampler.join(timeout=60)
    return {"health": latencies, "results": results, "peak": max(peak)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY if TINY.exists() else EMBEDDED)
    p.add_argument("--rounds", type=int, default=2, help="attacks of four bodies (>= 1)")
    p.add_argument(
        "--server-path",
        type=Path,
        default=None,
        help="a folder holding an older checkout as `marble/` (put first on the server's path)",
    )
    args = p.parse_args()
    env = {"MARBLE_LOG_LEVEL": "warning", "MARBLE_TORCH_THREADS": "1"}
    if args.server_path is not None:
        env["PYTHONPATH"] = f"{args.server_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    all_bodies = bodies()
    names = list(all_bodies)
    port = free_port()
    with local_server(["--model", str(args.model)], port=port, env=env) as (_, proc):
        warm = post(port, "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}')
        assert warm[0] == 200, warm
        before = rss_mb(proc.pid)
        print(f"server RSS before: {before:.0f} MB")
        health: list[float] = []
        peak = before
        for r in range(args.rounds):
            chosen = [(n, *all_bodies[n]) for n in (names * 2)[r : r + 4]]
            out = attack(port, proc.pid, chosen)
            health += out["health"]
            peak = max(peak, out["peak"])
            for name, (status, seconds) in out["results"].items():
                size = len(all_bodies[name][1]) / 1e6
                print(f"round {r}: {name:<12} {size:.1f} MB -> {status} in {seconds * 1000:.0f} ms")
        time.sleep(1.0)
        after = rss_mb(proc.pid)
    ms = sorted(x * 1000 for x in health)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"/health during the attacks: {len(ms)} polls, p50 {statistics.median(ms):.1f} ms, "
        f"p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )
    print(
        f"server RSS: before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB "
        f"(after - before: {after - before:+.0f} MB)"
    )


if __name__ == "__main__":
    main()
