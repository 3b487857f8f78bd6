"""SDAR over HTTP (the real app in-process, and a real uvicorn on 127.0.0.1 for the dashboard's
endless stream): the native step stream of a recorded run gives one step event per upstream
forward and the engine's final text; the official `openai` client's completions and chat
completions (sdar-tiny's own chat template) work; the dashboard firehose shows the steps."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI
from uvicorn.protocols.http.h11_impl import H11Protocol

from marble.scheduler.engine import Engine
from tests.sdar_golden import CASES, SDAR_TINY
from tests.server_helpers import parse_sse, serving, uvicorn_on_loopback

pytestmark = pytest.mark.anyio

CASE = next(c for c in CASES if c["name"] == "eos_early_stop_dynamic_b4_s4_th0.9")
# Its settings as a request body: 4 steps per block, the dynamic rule at 0.9, greedy.
BODY = {
    "prompt": CASE["prompt_ids"],
    "max_tokens": CASE["params"]["gen_length"],
    "block_length": 4,
    "steps": 4,
    "threshold": 0.9,
    "temperature": 0,
}


def engine_alone() -> Engine:
    return Engine.from_pretrained(SDAR_TINY, progress=False)


def engine_final(engine: Engine, prompt: str | list[int], **changes) -> str:
    outs = list(engine.generate(prompt, engine.defaults.replace(**changes)))
    return outs[-1].text


async def test_native_stream_replays_the_recorded_run():
    want = engine_final(
        engine_alone(), CASE["prompt_ids"], **{k: BODY[k] for k in BODY if k != "prompt"}
    )
    async with serving(SDAR_TINY) as (_, client):
        r = await client.post("/v1/diffusion/generate", json=BODY)
        assert r.status_code == 200, r.text
        events = [e.json() for e in parse_sse(r.text)]
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == CASE["num_forward_passes"]  # one step event per upstream forward
    prompt = len(CASE["prompt_ids"])
    for step, f in zip(steps, CASE["forwards"]):
        committed = sorted(c["pos"] for c in step["committed"])
        assert committed == sorted(p - prompt for p in f.get("committed", []))
        assert (step["forward"] == "encode") == (f["kind"] != "denoise")
    done = events[-1]
    assert done["type"] == "request.completed" and done["finish_reason"] == "stop"
    assert done["text"] == want and want
    assert done["usage"]["completion_tokens"] == len(CASE["answer_ids_cut_at_first_stop_id"]) - 1


async def test_the_openai_client_completes_and_chats():
    """A completion, and a chat whose template renders the recorded run's prompt ids: its
    answer is the recorded one (static rule, 4 steps per block)."""
    recorded = next(c for c in CASES if c["name"] == "static_b4_s4_gen32")
    static = {"block_length": 4, "steps": 4, "threshold": None, "ignore_eos": True}
    engine = engine_alone()
    want = engine_final(engine, "Why is the sky blue?", max_tokens=12)
    answer = engine.tokenizer.decode(recorded["generated_ids"][:32])
    async with serving(SDAR_TINY) as (_, client):
        api = AsyncOpenAI(base_url="http://marble/v1", api_key="unused", http_client=client)
        completion = await api.completions.create(
            model="marble", prompt="Why is the sky blue?", max_tokens=12
        )
        chat = await api.chat.completions.create(
            model="marble", messages=recorded["chat_messages"], max_tokens=32, extra_body=static
        )
    assert completion.choices[0].text == want
    assert chat.usage.prompt_tokens == len(recorded["prompt_ids"])
    assert chat.choices[0].message.content == answer
    assert chat.usage.completion_tokens == 32 and chat.choices[0].finish_reason == "length"


async def test_the_dashboard_stream_shows_the_steps():
    async with serving(SDAR_TINY) as (app, client):
        firehose = app.state.lifecycle.engine.registry.firehose
        async with uvicorn_on_loopback(app, H11Protocol) as (port, _):
            url = f"http://127.0.0.1:{port}/v1/diffusion/events"
            async with httpx.AsyncClient(timeout=60) as watcher:
                async with watcher.stream("GET", url) as stream:
                    for _ in range(500):
                        if firehose.subscribers:
                            break
                        await asyncio.sleep(0.01)
                    r = await client.post("/v1/diffusion/generate", json=BODY)
                    rid = r.headers["x-request-id"]
                    seen = await asyncio.wait_for(_events_until_done(stream, rid), 60)
    steps = [e for e in seen if e["type"] == "step"]
    assert len(steps) == CASE["num_forward_passes"]
    assert {s["forward"] for s in steps} == {"encode", "prefix_cached"}
    assert seen[-1]["text"] == parse_sse(r.text)[-1].json()["text"]


async def _events_until_done(stream: httpx.Response, request_id: str) -> list[dict]:
    """The firehose's events of one request, through its `request.completed`."""
    seen: list[dict] = []
    async for line in stream.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = json.loads(line[6:])
        if data.get("request_id") != request_id:
            continue
        seen.append(data)
        if data["type"] == "request.completed":
            break
    return seen
