"""One server, several models (`--also-serve`): each is listed with its own defaults, a request
names its model (none: the first), requests of every family run together in the same engine
steps and each gets what it gets alone, and an unknown name is a 404 listing the served ones."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from marble.server.settings import Settings
from tests.golden_cases import DG_CHECKPOINT, LLADA2_CHECKPOINT, REFERENCE
from tests.server_helpers import parse_sse, serving_loaded

pytestmark = pytest.mark.anyio
LLADA = REFERENCE / "llada-tiny"
BODIES = {
    "llada-tiny": {"max_tokens": 16, "seed": 3},
    "diffusiongemma-tiny": {"max_tokens": 16, "seed": 3},
    "llada2-tiny": {"max_tokens": 16, "block_length": 8, "threshold": 0.5, "editing_threshold": 0},
}


def _served():
    return serving_loaded(Settings(model=LLADA, also_serve=[DG_CHECKPOINT, LLADA2_CHECKPOINT]))


async def _generate(client: httpx.AsyncClient, model: str | None, prompt: str) -> list[dict]:
    body = {"prompt": prompt, "ignore_eos": True, **BODIES[model or "llada-tiny"]}
    if model is not None:
        body["model"] = model
    r = await client.post("/v1/diffusion/generate", json=body)
    assert r.status_code == 200, r.text
    return [{"event": e.event, **e.json()} for e in parse_sse(r.text)]


async def test_every_model_is_served_beside_the_others():
    async with _served() as client:
        cards = (await client.get("/v1/models")).json()["data"]
        assert [c["id"] for c in cards] == list(BODIES)
        assert cards[1]["defaults"]["steps"] is not None  # DiffusionGemma's own
        assert cards[2]["defaults"]["editing_threshold"] == 0.5  # LLaDA2.1's quality mode
        schema = (await client.get("/openapi.json")).json()
        assert set(
            schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["anyOf"][0][
                "enum"
            ]
        ) == set(BODIES)

        alone = {m: await _generate(client, m, "Hi there") for m in BODIES}
        together = await asyncio.gather(
            *(_generate(client, m, "Hi there") for m in BODIES for _ in range(2))
        )
        final = {m: e[-1]["text"] for m, e in alone.items()}
        for (model, _), events in zip([(m, i) for m in BODIES for i in range(2)], together):
            done = events[-1]
            assert done["event"] == "request.completed" and done["text"] == final[model]
            queued = next(e for e in events if e["event"] == "request.queued")
            assert queued["model"] == model
        steps = {m: [e for e in alone[m] if e["event"] == "step"] for m in BODIES}
        assert all("changed" in s and "accepted" in s for s in steps["diffusiongemma-tiny"])
        edits = [c for s in steps["llada2-tiny"] for c in s.get("changed", [])]
        assert edits and {c["op"] for c in edits} == {"edit"}
        assert all(not s.get("changed") for s in steps["llada-tiny"])

        # No name: the first model. An unknown name: 404 naming what is served.
        unnamed = await _generate(client, None, "Hi there")
        assert unnamed[-1]["text"] == final["llada-tiny"]
        r = await client.post("/v1/completions", json={"prompt": "x", "model": "absent"})
        assert r.status_code == 404 and "llada2-tiny" in r.json()["error"]["message"]
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "llada2-tiny", "messages": [{"role": "user", "content": "Hi!"}]},
        )
        assert chat.status_code == 200 and chat.json()["model"] == "llada2-tiny"
        assert chat.json()["usage"]["prompt_tokens"] == 25  # LLaDA2's own chat template
