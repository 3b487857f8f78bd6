"""LLaDA2 over HTTP: the native step stream carries edits with what each position held, the
events rebuild the final tokens, the OpenAI stream only appends whole finished blocks, chat
renders the Ling template, and what the model cannot do is refused by name."""

from __future__ import annotations

import pytest

from tests.golden_cases import LLADA2_CHECKPOINT as CHECKPOINT
from tests.server_helpers import parse_sse, serving

pytestmark = pytest.mark.anyio
# Speed mode: edits on every block of this random model.
BODY = {
    "prompt": "Hello, how are you today?",
    "max_tokens": 24,
    "block_length": 8,
    "threshold": 0.5,
    "editing_threshold": 0.0,
    "ignore_eos": True,
}


async def test_step_events_carry_commits_and_edits_that_rebuild_the_tokens():
    async with serving(CHECKPOINT) as (_, client):
        r = await client.post("/v1/diffusion/generate", json=BODY)
        events = parse_sse(r.text)
        metrics = (await client.get("/metrics")).text
    steps = [e.json() for e in events if e.event == "step"]
    completed = next(e.json() for e in events if e.event == "request.completed")
    shown: dict[int, int] = {}
    edits = 0
    for s in steps:
        for c in s["committed"]:
            assert c["pos"] not in shown  # a commit fills a mask
            shown[c["pos"]] = c["token_id"]
        for c in s.get("changed", []):
            assert c["op"] == "edit" and 0 <= c["pos"] < BODY["max_tokens"]
            assert shown[c["pos"]] == c["previous"] != c["token_id"]
            shown[c["pos"]] = c["token_id"]
            edits += 1
    assert edits > 0
    assert f'marble_corrections_total{{op="edit"}} {edits:.1f}' in metrics
    assert steps[0]["forward"] == "full" and {s["forward"] for s in steps[1:]} == {"prefix_cached"}
    blocks = [e.json() for e in events if e.event == "block.committed"]
    tokens = [t for b in blocks for t in b["tokens"]]
    assert tokens == [shown[i] for i in range(BODY["max_tokens"])]
    assert completed["forwards"] == {"full": 1, "prefix_cached": len(steps) - 1}


async def test_the_openai_stream_appends_only_finished_blocks():
    async with serving(CHECKPOINT) as (_, client):
        whole = (await client.post("/v1/completions", json=BODY)).json()
        r = await client.post("/v1/completions", json={**BODY, "stream": True})
        chunks = [e.json() for e in parse_sse(r.text) if e.data != "[DONE]"]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert 1 <= len(texts) <= 4  # the prompt's tail block and whole blocks after it


async def test_chat_and_refusals():
    messages = [{"role": "user", "content": "Hi!"}]
    async with serving(CHECKPOINT) as (_, client):
        r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == 25  # the golden's rendered "Hi!" prompt
        card = (await client.get("/v1/models")).json()["data"][0]
        assert card["defaults"]["editing_threshold"] == 0.5
        for body, param in [
            ({**BODY, "threshold": None, "steps": 8}, "threshold"),
            ({**BODY, "verify_threshold": 0.3}, "verify_threshold"),
            ({**BODY, "cfg_scale": 1.0}, "cfg_scale"),
            ({**BODY, "editing_threshold": 2}, "editing_threshold"),
        ]:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["param"] == param
