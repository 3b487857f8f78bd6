"""DiffusionGemma over HTTP: the native step stream of a canvas whose tokens change, the
append-only OpenAI stream, thinking through chat_template_kwargs, refusals and metrics."""

from __future__ import annotations

import pytest

from tests.golden_cases import DG_CHECKPOINT as CHECKPOINT
from tests.server_helpers import parse_sse, serving

pytestmark = pytest.mark.anyio
BODY = {"prompt": "Why is the sky blue?", "max_tokens": 40, "seed": 5, "ignore_eos": True}


async def test_step_events_describe_every_change_and_the_canvas_start():
    async with serving(CHECKPOINT) as (_, client):
        r = await client.post("/v1/diffusion/generate", json=BODY)
        events = parse_sse(r.text)
    steps = [e.json() for e in events if e.event == "step"]
    completed = next(e.json() for e in events if e.event == "request.completed")
    length = 16
    starts = [s for s in steps if "canvas" in s]
    assert [s["canvas"]["start"] for s in starts] == [0, 16, 32]  # 40 tokens: three canvases
    assert all(s["forwards"] == {"decode": 1, "encode": 1} for s in starts)
    # Replaying the events rebuilds every canvas: a start carries it whole, each later step's
    # changes start from what the client already holds.
    shown: dict[int, int] = {}
    for s in steps:
        assert s["accepted"] + s["renoised"] == length
        start = "canvas" in s
        if start:
            for i, token in enumerate(s["canvas"]["token_ids"]):
                shown[s["canvas"]["start"] + i] = token
        for c in s["changed"]:
            assert c["op"] in ("accept", "renoise", "final") and c["pos"] < BODY["max_tokens"]
            if start:
                assert shown[c["pos"]] == c["token_id"]
            else:
                assert shown[c["pos"]] == c["previous"]
                shown[c["pos"]] = c["token_id"]
        assert set(s["kept"]) <= set(range(BODY["max_tokens"]))
    for block in (e.json() for e in events if e.event == "block.committed"):
        assert [shown[block["start"] + i] for i in range(len(block["tokens"]))] == block["tokens"]
    finals = [s for s in steps if s["canvas_completed"]]
    assert len(finals) == 3
    assert completed["usage"]["completion_tokens"] == BODY["max_tokens"]
    assert completed["forwards"] == {"encode": 3, "decode": len(steps)}


async def test_the_openai_stream_only_appends_whole_canvases():
    async with serving(CHECKPOINT) as (_, client):
        whole = (await client.post("/v1/completions", json=BODY)).json()
        r = await client.post("/v1/completions", json={**BODY, "stream": True})
        chunks = [e.json() for e in parse_sse(r.text) if e.data != "[DONE]"]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
        metrics = (await client.get("/metrics")).text
    assert "".join(texts) == whole["choices"][0]["text"]
    assert 1 <= len(texts) <= 3  # at most one delta per canvas: text shown never changes
    assert 'marble_forwards_total{kind="encode"} 6.0' in metrics
    assert 'marble_canvas_positions_per_step_count{op="renoised"}' in metrics
    assert "marble_canvases_per_request_sum 6.0" in metrics


async def test_thinking_and_what_is_refused():
    messages = [{"role": "user", "content": "Hi"}]
    async with serving(CHECKPOINT) as (_, client):
        plain = await client.post("/v1/chat/completions", json={"messages": messages})
        thinking = await client.post(
            "/v1/chat/completions",
            json={"messages": messages, "chat_template_kwargs": {"enable_thinking": True}},
        )
        assert plain.status_code == thinking.status_code == 200
        assert thinking.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
        image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": image}]}
        )
        assert r.status_code == 400 and "image" in r.json()["error"]["message"]
        for body, param in [
            ({**BODY, "block_length": 8}, "block_length"),
            ({**BODY, "suffix": "x"}, "suffix"),
            ({**BODY, "t_min": 0.9}, "t_min"),
        ]:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
