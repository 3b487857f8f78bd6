"""Three Marble replicas (r1, r2, r3) behind a real nginx on 127.0.0.1, configured by
deploy/nginx/render.py: requests spread by least connections, the balancer adds little to the
first `step` event, attach-by-id reaches the owner, a killed replica loses only its own
requests and rejoins, a terminated one drains with nothing failed. The tests share one set of
processes and run in order (the last two change it); each prints the figures it measured."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, stop_server
from tests.server_helpers import parse_sse

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

# Debian puts it in /usr/sbin, which is not on every user's PATH.
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
TAGS = ("r1", "r2", "r3")
FAIL_TIMEOUT_S = 2  # how long nginx rests a failed replica: short, so the rejoin shows quickly
SHORT = {"prompt": "Hello", "max_tokens": 16, "steps": 16}
# Seconds of work on any CPU (dozens of steps), so signals land while it runs.
LONG = {"prompt": "Once upon a time", "max_tokens": 96, "steps": 96, "ignore_eos": True}


def wait_until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)  # polling a condition, not waiting a fixed time
    raise TimeoutError(f"no {what} after {timeout} s")


class Replica:
    """`python -m marble.server --replica-id TAG` (the embedded model) on a fixed port, so a
    restart comes back where nginx expects it."""

    def __init__(self, tag: str, port: int, logs: Path) -> None:
        self.tag, self.port, self.log = tag, port, logs / f"{tag}.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # One torch thread each: three replicas and nginx share the machine's cores.
        cmd = [sys.executable, "-m", "marble.server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--replica-id", self.tag, "--torch-threads", "1"]
        cmd += ["--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"{self.tag} exited: {self.log.read_text()}"
            try:
                return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, f"/health 200 from {self.tag}", timeout)


@dataclass
class Cluster:
    url: str  # nginx
    replicas: dict[str, Replica]
    access_log: Path
    owned: dict[str, str] = field(default_factory=dict)  # tag -> a finished request's id


def nginx_config(prefix: Path, port: int, replicas: dict[str, Replica]) -> Path:
    """deploy/nginx/render.py's file, inside a main config that keeps everything in `prefix`."""
    upstreams = [f"{tag}=127.0.0.1:{r.port}" for tag, r in replicas.items()]
    access_log = prefix / "access.log"
    rendered = subprocess.run(
        [sys.executable, str(REPO / "deploy/nginx/render.py"), "static"]
        + ["--listen", f"127.0.0.1:{port}", "--fail-timeout", str(FAIL_TIMEOUT_S)]
        + ["--access-log", str(access_log), *upstreams],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (prefix / "marble.conf").write_text(rendered)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = prefix / "nginx.conf"
    main.write_text(
        f"pid {prefix / 'nginx.pid'};\nworker_processes 1;\nevents {{}}\n"
        f"http {{\n{temp}\n    include {prefix / 'marble.conf'};\n}}\n"
    )
    return main


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    prefix = tmp_path_factory.mktemp("scale-out")
    replicas = {tag: Replica(tag, free_port(), prefix) for tag in TAGS}
    port = free_port()
    config = nginx_config(prefix, port, replicas)
    error_log = prefix / "error.log"
    # In the foreground, so it is this test's child and stops with it.
    cmd = [NGINX, "-e", str(error_log), "-p", str(prefix), "-c", str(config)]
    nginx = subprocess.Popen([*cmd, "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        for replica in replicas.values():
            replica.start()  # all load at once
        for replica in replicas.values():
            replica.wait_ready()
        url = f"http://127.0.0.1:{port}"

        def balancer_up() -> bool:
            assert nginx.poll() is None, nginx.stderr.read().decode() + error_log.read_text()
            try:
                return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(balancer_up, "nginx")
        yield Cluster(url, replicas, prefix / "access.log")
    finally:
        for replica in replicas.values():
            if replica.proc is not None and replica.proc.poll() is None:
                stop_server(replica.proc)
        nginx.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight, then exit
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()


@dataclass
class Stream:
    """What a client saw of one `POST /v1/diffusion/generate`."""

    request_id: str = ""
    events: list[str] = field(default_factory=list)
    ids_in_events: set[str] = field(default_factory=set)
    error: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the first `step` arrived

    @property
    def tag(self) -> str:
        return self.request_id.split("-", 1)[0]

    @property
    def completed(self) -> bool:
        return self.error is None and self.events[-1:] == ["request.completed"]


async def read_events(response: httpx.Response, stream: Stream) -> None:
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            stream.events.append(line[7:])
            if line == "event: step":
                stream.started.set()
        elif line.startswith("data: "):
            stream.ids_in_events.add(json.loads(line[6:])["request_id"])


async def generate(
    client: httpx.AsyncClient, url: str, body: dict, stream: Stream | None = None
) -> Stream:
    """Submit and read the step stream to its end; a cut connection is recorded, not raised."""
    stream = stream or Stream()
    try:
        async with client.stream("POST", f"{url}/v1/diffusion/generate", json=body) as response:
            stream.request_id = response.headers.get("x-request-id", "")
            if response.status_code != 200:
                stream.error = f"{response.status_code}: {(await response.aread()).decode()}"
                return stream
            await read_events(response, stream)
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    return stream


async def time_to_first_step(client: httpx.AsyncClient, url: str) -> float:
    """Seconds from sending a request to its first `step` event (the stream is then left,
    which aborts the request)."""
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/diffusion/generate", json=SHORT) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "event: step":
                return time.perf_counter() - t0
    raise AssertionError("no step event")


async def long_streams(client: httpx.AsyncClient, url: str, n: int) -> list[asyncio.Task]:
    """`n` long requests through the balancer, returned once each has had a `step` event."""
    streams = [Stream() for _ in range(n)]
    tasks = [asyncio.create_task(generate(client, url, LONG, s)) for s in streams]
    started = asyncio.ensure_future(asyncio.gather(*(s.started.wait() for s in streams)))
    # A request that ends before its first step (refused, cut) ends the wait too.
    done, _ = await asyncio.wait([started, *tasks], timeout=60, return_when="FIRST_COMPLETED")
    if started not in done:
        errors = [s.error for s in streams]
        for pending in (started, *tasks):
            pending.cancel()
        await asyncio.gather(started, *tasks, return_exceptions=True)
        raise AssertionError(f"not every request started: {errors}")
    return tasks


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=64))


async def test_concurrent_requests_spread_over_every_replica(cluster: Cluster):
    async with new_client() as c:
        streams = await asyncio.gather(*(generate(c, cluster.url, SHORT) for _ in range(30)))
    assert all(s.completed for s in streams), [s.error for s in streams if not s.completed]
    # X-Request-Id passes the balancer unchanged: it is the id the events carry.
    assert all(s.ids_in_events == {s.request_id} for s in streams)
    counts = Counter(s.tag for s in streams)
    print(f"\n30 concurrent requests through nginx, per replica: {dict(sorted(counts.items()))}")
    assert set(counts) == set(TAGS) and sum(counts.values()) == 30
    cluster.owned.update({s.tag: s.request_id for s in streams})


async def test_first_step_through_the_balancer_within_50ms_of_direct(cluster: Cluster):
    direct_url = cluster.replicas["r1"].url
    direct, balanced = [], []
    async with new_client() as c:
        await time_to_first_step(c, direct_url)  # warm-up, not counted
        for _ in range(7):  # alternate, so a noisy moment hits both
            direct.append(await time_to_first_step(c, direct_url))
            balanced.append(await time_to_first_step(c, cluster.url))
    d, b = statistics.median(direct), statistics.median(balanced)
    print(f"\nfirst step, median of 7: direct {d * 1000:.1f} ms, through nginx {b * 1000:.1f} ms")
    assert b - d < 0.050


async def test_attach_by_id_reaches_the_owner(cluster: Cluster):
    assert set(cluster.owned) == set(TAGS)
    async with new_client() as c:
        for tag, request_id in cluster.owned.items():
            for path in (request_id, f"gen-{request_id}"):
                r = await c.get(f"{cluster.url}/v1/diffusion/requests/{path}/events")
                assert r.status_code == 200, (tag, r.text)
                events = parse_sse(r.text)  # the whole log, replayed
                assert events[0].id == "1" and events[-1].event == "request.completed"
                assert {e.json()["request_id"] for e in events} == {request_id}
            # Only the owner has it: a direct attach to another replica finds nothing.
            other = next(t for t in TAGS if t != tag)
            url = cluster.replicas[other].url
            miss = await c.get(f"{url}/v1/diffusion/requests/{request_id}/events")
            assert miss.status_code == 404
    print(f"\nattached through nginx to a request of each of {sorted(cluster.owned)}")


async def test_killed_replica_loses_only_its_requests_and_rejoins(cluster: Cluster):
    victim = cluster.replicas["r2"]
    async with new_client() as c:
        tasks = await long_streams(c, cluster.url, 6)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        streams = await asyncio.gather(*tasks)
        lost = [s for s in streams if not s.completed]
        on_victim = [s for s in streams if s.tag == "r2"]
        print(
            f"\nSIGKILL r2 mid-run: in flight per replica "
            f"{dict(sorted(Counter(s.tag for s in streams).items()))}, lost {len(lost)} "
            f"(all on {sorted({s.tag for s in lost})})"
        )
        assert lost and lost == on_victim
        # Cut, not replayed on another replica (that would show a second `request.queued`):
        # nginx retries nothing once the response has started.
        assert all(s.error and s.events.count("request.queued") == 1 for s in lost)
        print(f"a lost stream ends with {lost[0].error}")

        after = await asyncio.gather(*(generate(c, cluster.url, SHORT) for _ in range(12)))
        assert all(s.completed for s in after), [s.error for s in after]
        assert "r2" not in {s.tag for s in after}
        print(
            f"12 new requests, per replica: {dict(sorted(Counter(s.tag for s in after).items()))}"
        )

        victim.start()  # same port: nginx's configuration still names it
        victim.wait_ready()
        t0 = time.perf_counter()
        tags = []
        while "r2" not in tags:
            assert time.perf_counter() - t0 < 10 * FAIL_TIMEOUT_S, tags
            s = await generate(c, cluster.url, SHORT)
            assert s.completed, s.error
            tags.append(s.tag)
        print(
            f"restarted r2 received request {len(tags)} sent after it was ready "
            f"({time.perf_counter() - t0:.1f} s; nginx rests a failed replica "
            f"{FAIL_TIMEOUT_S} s)"
        )


async def test_terminated_replica_drains_with_no_failed_request(cluster: Cluster):
    leaving = cluster.replicas["r3"]
    log_before = cluster.access_log.read_text().count("\n")
    async with new_client() as c:
        tasks = await long_streams(c, cluster.url, 6)
        leaving.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10  # the drain starts on the server's next tick (0.1 s)
        while (await c.get(f"{leaving.url}/health")).status_code != 503:
            assert time.monotonic() < deadline, "r3 did not start draining"
            await asyncio.sleep(0.02)  # polling a condition, not waiting a fixed time
        during = await asyncio.gather(*(generate(c, cluster.url, SHORT) for _ in range(12)))
        streams = await asyncio.gather(*tasks)
    assert leaving.proc.wait(60) == 0, leaving.log.read_text()
    in_flight = Counter(s.tag for s in streams)
    assert in_flight["r3"] >= 1
    assert all(s.completed for s in [*streams, *during]), [
        s.error for s in [*streams, *during] if not s.completed
    ]
    new_on = Counter(s.tag for s in during)
    lines = cluster.access_log.read_text().splitlines()[log_before:]
    retried = [ln for ln in lines if "upstream_status=503, " in ln]
    print(
        f"\nSIGTERM r3 with in flight per replica {dict(sorted(in_flight.items()))}: every one "
        f"completed; 12 requests sent while it drained went to {dict(sorted(new_on.items()))}, "
        f"{len(retried)} of them retried by nginx after a 503 from r3"
    )
    assert "r3" not in new_on
