"""Settings, CLI, log redaction, readiness while loading, the metric set, and the
engine-failure boundary."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import httpx
import pytest

import marble.model.default
from marble.server import cli
from marble.server import lifecycle as lifecycle_module
from marble.server.app import create_app
from marble.server.log_redaction import RedactSecrets
from marble.server.metrics import Metrics
from marble.server.settings import Settings
from tests.server_helpers import serving, tiny_engine

METRICS = [
    "marble_requests_running",
    "marble_requests_waiting",
    "marble_batch_size",
    "marble_requests_total",
    "marble_requests_rejected_total",
    "marble_prompt_tokens_total",
    "marble_generation_tokens_total",
    "marble_denoising_steps_total",
    "marble_client_disconnects_total",
    "marble_dropped_step_events_total",
    "marble_request_errors_total",
    "marble_open_streams",
    "marble_queue_time_seconds",
    "marble_time_to_first_step_seconds",
    "marble_time_to_first_text_seconds",
    "marble_e2e_request_latency_seconds",
    "marble_step_duration_seconds",
    "marble_steps_per_request",
    "marble_tokens_committed_per_forward",
]


def test_settings_from_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("MARBLE_MAX_QUEUE", "5")
    monkeypatch.setenv("MARBLE_PORT", "9001")
    assert Settings().max_queue == 5
    parser = cli._parser()
    args = parser.parse_args(["serve", "--port", "9100", "--model", str(tmp_path)])
    settings = cli.settings_from_args(args)
    assert (settings.port, settings.max_queue, settings.model) == (9100, 5, tmp_path)


def test_serve_without_a_model_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(marble.model.default, "CHECKPOINT_DIR", tmp_path / "missing")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "embedded default model" in err
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_log_redaction_hides_only_the_api_key_value():
    line = '"GET /v1/diffusion/events?last_event_id=3&api%5Fkey=s3cret&API_KEY=x HTTP/1.1" 200'
    record = logging.LogRecord("uvicorn.access", 20, "", 0, "%s - %s", ("1.2.3.4", line), None)
    assert RedactSecrets().filter(record)
    assert record.args == (
        "1.2.3.4",
        '"GET /v1/diffusion/events?last_event_id=3&api%5Fkey=***&API_KEY=*** HTTP/1.1" 200',
    )


@pytest.mark.anyio
async def test_health_is_503_while_loading_then_ready(monkeypatch, llada_tiny_path):
    release = threading.Event()

    def slow_build(settings):
        release.wait(10)
        return tiny_engine(llada_tiny_path)

    monkeypatch.setattr(lifecycle_module, "build_engine", slow_build)
    app = create_app(Settings(model=llada_tiny_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert (await client.get("/live")).status_code == 200
            r = await client.post("/v1/completions", json={"prompt": "a"})
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["error"]["code"] == "not_ready"
            release.set()
            for _ in range(500):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            assert (await client.get("/health")).json()["model"] == "llada-tiny"
            r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "llada-tiny"


@pytest.mark.anyio
async def test_failed_load_is_reported(monkeypatch, llada_tiny_path):
    def broken(settings):
        raise FileNotFoundError("no weights here")

    monkeypatch.setattr(lifecycle_module, "build_engine", broken)
    app = create_app(Settings(model=llada_tiny_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
            for _ in range(500):
                r = await client.get("/health")
                if r.json()["status"] != "loading":
                    break
                await asyncio.sleep(0.01)
            assert r.status_code == 503 and "no weights here" in r.json()["error"]


@pytest.mark.anyio
async def test_metrics_expose_the_full_set(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "steps": 2})
        r = await client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        for name in METRICS:
            assert f"# HELP {name.removesuffix('_total')}" in text, name
        assert "marble_denoising_steps_total 2.0" in text
        assert "marble_generation_tokens_total 4.0" in text
        assert 'marble_requests_total{outcome="length"} 1.0' in text
        assert "marble_steps_per_request_count 1.0" in text


@pytest.mark.anyio
async def test_engine_failure_fails_requests_and_keeps_serving(llada_tiny_path):
    engine = tiny_engine(llada_tiny_path)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    engine.step = flaky_step
    async with serving(llada_tiny_path, engine=engine) as (_, client):
        req = {"prompt": "a", "max_tokens": 8, "steps": 8, "ignore_eos": True}
        r = await client.post("/v1/completions", json=req)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "boom" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json=req)
        assert r.status_code == 200
        calls.clear()
        r = await client.post("/v1/completions", json={**req, "stream": True})
        lines = [ln[6:] for ln in r.text.split("\n") if ln]
        assert lines[-1] == "[DONE]" and "boom" in json.loads(lines[-2])["error"]["message"]


def test_every_help_text_renders():
    """`marble --help`, `marble serve --help` and `python -m marble.server --help` print (a
    stray % in a flag's help once made argparse raise instead)."""
    import subprocess
    import sys

    for args in (["-m", "marble.server", "--help"], ["-m", "marble.server", "serve", "--help"]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "--kv-cache-bytes" in done.stdout


@pytest.mark.anyio
async def test_a_metrics_failure_loses_no_output(llada_tiny_path, monkeypatch):
    """Before: an exception while recording a step's metrics ended the engine thread, and
    every request in flight then, and after, waited forever."""
    real, calls = Metrics.observe_step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("metrics bug")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Metrics, "observe_step", failing)
    req = {"prompt": "a", "max_tokens": 4, "steps": 4, "ignore_eos": True}
    async with serving(llada_tiny_path) as (_, client):
        for _ in range(2):
            r = await asyncio.wait_for(client.post("/v1/completions", json=req), 30)
            assert r.status_code == 200, r.text
    assert len(calls) > 1
