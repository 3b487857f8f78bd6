"""Refusing a body costs what its size allows, not what its bad values add up to: a few
errors whatever the number of bad items, parsed and validated off the event loop, and a
body of a million arrays refused from a count over its bytes before it is parsed."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from typing import Any

import pytest
from pydantic import ValidationError

from marble.server.json_body import MAX_CONTAINERS, MAX_DEPTH, containers, nesting
from marble.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server_helpers import serving

# Each ~3-4 MB, under the 4 MiB body limit; before: 1M errors each, 1.6 s and 1.26 GB to
# describe, all of it on the event loop.
HOSTILE = [
    ("/v1/completions", {"prompt": [[1]] * 975_000, "max_tokens": 8}),
    ("/v1/completions", {"prompt": [{}] * 1_000_000}),
    ("/v1/diffusion/generate", {"prompt": ["a"] * 1_000_000}),
    ("/v1/completions", {"prompt": [-1] * 1_000_000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 110_000}),
]
FEW_BAD = [
    (CompletionRequest, {"prompt": [-1] * 100_000}),
    (CompletionRequest, {"prompt": [[1], [-1]] * 50_000}),
    (CompletionRequest, {"prompt": "hi", "stop": [1] * 100_000}),
    (ChatCompletionRequest, {"messages": [{"role": "nobody"}] * 100_000}),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [1] * 100_000}]}),
    (
        ChatCompletionRequest,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {str(i): [] for i in range(100_000)},
        },
    ),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values())
    return 0


@pytest.mark.parametrize("model,body", FEW_BAD, ids=lambda v: repr(v)[:30])
def test_a_hundred_thousand_bad_items_make_a_few_errors(model, body):
    """Before: one error per bad item (100k), each copying its input."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert caught.value.error_count() <= 8


@pytest.mark.parametrize(
    "value",
    [
        {"prompt": "[[{{ not ] structure {", "stop": ["[", "{"]},
        {"prompt": 'a \\" [ \\\\" ['},
        {"prompt": [[1, 2], [3]], "x": [{"a": [{}]}], "y": "\\\\[{\\u005c"},
        [[]] * (MAX_CONTAINERS + 5),
        ["[{"] * (MAX_CONTAINERS + 5),
        {"messages": [{"content": "}{][" * 10, "k": ["\\\\"]}] * (MAX_CONTAINERS // 3)},
    ],
    ids=range(6),
)
def test_containers_are_counted_outside_strings(value):
    raw = json.dumps(value).encode()
    assert containers(raw) == _count(value)
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert containers(raw) == _count(value)


@pytest.mark.anyio
async def test_large_invalid_bodies_are_refused_without_stalling_the_server(llada_tiny_path):
    """Before: each body took 4.5-12 s to refuse with the event loop blocked all along
    (/health waited as long) and 1.26 GB to describe."""
    bodies = [(path, json.dumps(body, separators=(",", ":")).encode()) for path, body in HOSTILE]
    headers = {"content-type": "application/json"}
    async with serving(llada_tiny_path) as (_, client):
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})  # warm
        peak = _peak_rss_mb()
        health: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                assert (await client.get("/health")).status_code == 200
                health.append(time.perf_counter())
                await asyncio.sleep(0.01)

        async def refuse(path: str, raw: bytes) -> Any:
            return await client.post(path, content=raw, headers=headers)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.05)
        responses = await asyncio.gather(*(refuse(path, raw) for path, raw in bodies))
        done.set()
        await poller
        for response in responses:
            assert response.status_code == 400, response.text[:200]
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert (error["param"] or "prompt").split(".")[0] in ("prompt", "messages")
            assert len(response.content) < 1000  # the body is never quoted back
        metrics = (await client.get("/metrics")).text
        refused = [
            line
            for line in metrics.splitlines()
            if line.startswith("marble_requests_rejected_total") and 'reason="invalid"' in line
        ]
        assert refused and float(refused[0].split()[-1]) >= len(bodies)
    gaps = [b - a for a, b in zip(health, health[1:], strict=False)]
    assert gaps and max(gaps) < 1.0  # between two answers of /health; generous: before, 5-12 s
    assert _peak_rss_mb() - peak < 300  # before: +1.3 GB a body


@pytest.mark.anyio
async def test_a_body_that_is_not_an_object_is_named_not_quoted(llada_tiny_path):
    headers = {"content-type": "application/json"}
    async with serving(llada_tiny_path) as (_, client):
        for raw in (json.dumps([7] * 500_000).encode(), b'"' + b"x" * 100_000 + b'"'):
            r = await client.post("/v1/completions", content=raw, headers=headers)
            assert r.status_code == 400 and len(r.content) < 500
            assert "must be a JSON object" in r.json()["error"]["message"]
        deep = b"[" * 100_000 + b"]" * 100_000
        r = await client.post("/v1/completions", content=deep, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] is None


@pytest.mark.anyio
@pytest.mark.parametrize("levels", [60, 400])
async def test_a_deeply_nested_body_is_a_400_and_the_server_serves_on(llada_tiny_path, levels):
    """Before: a schema nested 400 deep (a body over 16 KiB, parsed in the parser process)
    parsed, then broke the pickling that brings it back: a 500. 60 levels: a small body,
    parsed in the server's own process."""
    schema = '{"type":"object","properties":{"k":' * levels + '{"type":"integer"}'
    schema += '},"required":["k"]}' * levels
    body = '{"prompt":"a","max_tokens":2,"guided_json":' + schema + "}"
    async with serving(llada_tiny_path) as (_, client):
        r = await client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert f"more than {MAX_DEPTH} deep" in r.json()["error"]["message"]
        ok = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200
    assert nesting(json.loads(body)) > MAX_DEPTH
