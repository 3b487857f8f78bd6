"""A real Prometheus (Debian's `prometheus`) scrapes a real server on 127.0.0.1 that has an API
key, sending it as a Bearer token from a file: after a few requests the request counter is
queryable, and every PromQL expression of the shipped Grafana
dashboard is valid against the scraped series. The shipped config passes `promtool check config`.

Needs `apt-get install prometheus` (it brings promtool); skipped with a reason without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, running_server

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "marble.json"
KEY = "scrape-key"  # /metrics needs it: the server has no --public-ops
AUTH = {"Authorization": f"Bearer {KEY}"}


def _wait(what: str, check, timeout: float) -> object:
    """Poll `check` until it returns a truthy value; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def metrics_server(llada_tiny_path: Path) -> Iterator[str]:
    with running_server(llada_tiny_path, "--api-key", KEY) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        yield url


@pytest.fixture(scope="module")
def prometheus(metrics_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    target = metrics_server.removeprefix("http://")
    (tmp / "marble_api_key").write_text(KEY + "\n")
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: marble\n"
        f"    authorization:\n      credentials_file: {tmp / 'marble_api_key'}\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait("prometheus ready", ready, 60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(prom: str, expr: str) -> dict:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def test_shipped_config_is_valid() -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    out = subprocess.run(
        [PROMTOOL, "check", "config", str(REPO / "docker" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_scrapes_the_request_counter(metrics_server: str, prometheus: str) -> None:
    n = 3
    for i in range(n):
        body = {"prompt": f"Counting {i}", "max_tokens": 8, "steps": 4, "block_length": 8}
        r = httpx.post(f"{metrics_server}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    start = time.monotonic()

    def counted() -> float:
        result = _query(prometheus, 'sum(marble_requests_total{job="marble"})')["result"]
        return float(result[0]["value"][1]) if result else 0.0

    total = _wait("marble_requests_total >= n in Prometheus", lambda: counted() >= n, 60)
    value = counted()
    print(f"\nPromQL sum(marble_requests_total) = {value:g} after {time.monotonic() - start:.1f} s")
    assert total and value >= n
    steps = _query(prometheus, "sum(marble_denoising_steps_total)")["result"]
    assert float(steps[0]["value"][1]) >= n * 4 / 16  # at least one step per batch


def test_dashboard_queries_are_valid_and_named_right(metrics_server: str, prometheus: str) -> None:
    """Each Grafana panel's PromQL parses and names only metrics the server exports."""
    exported = set(
        re.findall(
            r"^(marble_[a-z_]+)", httpx.get(f"{metrics_server}/metrics", headers=AUTH).text, re.M
        )
    )
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        for name in re.findall(r"\bmarble_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported by /metrics"
        # Grafana's $__rate_interval is not PromQL: give Prometheus a literal window.
        _query(prometheus, expr.replace("$__rate_interval", "1m"))
