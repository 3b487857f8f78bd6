"""OpenAI endpoints in-process: shapes, streams, n, echo, suffix, stop, seed, logprobs,
usage, diffusing drafts, and every error in OpenAI's shape."""

from __future__ import annotations

import json

import pytest

from marble.server.settings import Settings
from tests.server_helpers import serving, tiny_engine

pytestmark = pytest.mark.anyio

FIXED = {"max_tokens": 16, "steps": 8, "block_length": 8}  # 8 forwards, 2 tokens each


def data_lines(text: str) -> list[str]:
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines  # no events, ids, pings
    return [line[6:] for line in lines]


async def test_completion_shape_and_request_id(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        r = await client.post("/v1/completions", json={"prompt": "Hello", **FIXED})
        assert r.status_code == 200
        body = r.json()
        assert body["id"] == "cmpl-" + r.headers["x-request-id"]
        assert body["object"] == "text_completion"
        (choice,) = body["choices"]
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == body["model"] == "marble"
        assert (await client.get("/v1/models/marble")).json()["id"] == "marble"
        assert (await client.get("/v1/models/other")).status_code == 404


async def test_stream_deltas_concatenate_to_the_blocking_text(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"prompt": "Once upon", "ignore_eos": True, **FIXED}
        full = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
        r = await client.post(
            "/v1/completions",
            json={**req, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = data_lines(r.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        usage = chunks[-1]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == full
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_n_choices_and_seeds(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"prompt": "Hi", "n": 2, "seed": 7, "temperature": 1.0, "ignore_eos": True, **FIXED}
        a = (await client.post("/v1/completions", json=req)).json()
        b = (await client.post("/v1/completions", json=req)).json()
        assert [c["index"] for c in a["choices"]] == [0, 1]
        assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
        assert a["choices"][0]["text"] != a["choices"][1]["text"]  # seed + k per choice
        assert a["usage"]["completion_tokens"] == 32
        # Several prompts x n: index = prompt * n + k, prompt tokens counted once per prompt.
        multi = (
            await client.post("/v1/completions", json={**req, "prompt": ["Hi", "Hello there"]})
        ).json()
        assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
        assert multi["choices"][0]["text"] == a["choices"][0]["text"]


async def test_token_prompt_echo_and_logprobs(llada_tiny_path):
    async with serving(llada_tiny_path) as (app, client):
        ids = app.state.lifecycle.engine.served().tokenizer.encode("Hello")
        r = await client.post(
            "/v1/completions",
            json={"prompt": ids, "echo": True, "logprobs": 1, "ignore_eos": True, **FIXED},
        )
        choice = r.json()["choices"][0]
        assert choice["text"].startswith("Hello")
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 16
        assert all(x <= 0 for x in lp["token_logprobs"])
        assert lp["text_offset"][0] == len("Hello")
        assert [list(d) for d in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]


async def test_suffix_infills_between_prompt_and_suffix(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"prompt": "def f(", "suffix": "):\n    return x", "ignore_eos": True, **FIXED}
        with_suffix = (await client.post("/v1/completions", json=req)).json()
        req.pop("suffix")
        without = (await client.post("/v1/completions", json=req)).json()
        assert with_suffix["choices"][0]["text"] != without["choices"][0]["text"]


async def test_stop_string_cuts_the_text(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"prompt": "Hello", "ignore_eos": True, **FIXED}
        full = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
        stop = full[5:7]
        assert stop.strip("\ufffd")
        for stream in (False, True):
            r = await client.post("/v1/completions", json={**req, "stop": stop, "stream": stream})
            if stream:
                chunks = [json.loads(p) for p in data_lines(r.text)[:-1]]
                text = "".join(c["choices"][0]["text"] for c in chunks)
                reason = chunks[-1]["choices"][0]["finish_reason"]
            else:
                text = r.json()["choices"][0]["text"]
                reason = r.json()["choices"][0]["finish_reason"]
            assert text == full[: full.index(stop)]
            assert reason == "stop"


async def test_diffusing_streams_whole_drafts(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"prompt": "Hello", "ignore_eos": True, **FIXED}
        final = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
        r = await client.post("/v1/completions", json={**req, "stream": True, "diffusing": True})
        texts = [json.loads(p)["choices"][0]["text"] for p in data_lines(r.text)[:-1]]
        assert len(texts) >= 4
        assert "\u2592" in texts[0]  # still-masked positions show as placeholders
        masks = [t.count("\u2592") for t in texts]
        assert masks == sorted(masks, reverse=True)
        assert texts[-1] == final


async def test_chat_completion_and_stream(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        req = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 8}
        body = (await client.post("/v1/chat/completions", json=req)).json()
        assert body["object"] == "chat.completion"
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant" and isinstance(message["content"], str)
        r = await client.post(
            "/v1/chat/completions", json={**req, "stream": True, "logprobs": True}
        )
        chunks = [json.loads(p) for p in data_lines(r.text)[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert content == message["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_chat_without_template_is_400(llada_tiny_path):
    engine = tiny_engine(llada_tiny_path)
    engine.tokenizer.chat_template = None
    async with serving(llada_tiny_path, engine=engine) as (_, client):
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "no_chat_template"


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert r.headers["x-request-id"]
    return error


async def test_errors_have_openai_shape(llada_tiny_path):
    async with serving(llada_tiny_path, Settings(max_body_bytes=2048)) as (_, client):
        assert_error(await client.post("/v1/completions", json={"max_tokens": 4}), 400)  # no prompt
        err = assert_error(await client.post("/v1/completions", json={"prompt": "a", "n": 0}), 400)
        assert err["param"] == "n"
        err = assert_error(
            await client.post("/v1/completions", json={"prompt": "a", "remasking": "nope"}), 400
        )
        assert err["param"] == "remasking"
        assert_error(
            await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 100000}), 400
        )
        assert_error(await client.post("/v1/completions", json={"prompt": []}), 400)
        assert_error(await client.post("/v1/completions", content=b"{not json"), 400)
        assert_error(
            await client.post("/v1/completions", json={"prompt": "a", "model": "gpt-4"}),
            404,
            "model_not_found",
        )
        assert_error(await client.get("/v1/nothing"), 404)
        big = {"prompt": "x" * 4096}
        assert_error(await client.post("/v1/completions", json=big), 413, "body_too_large")

        async def chunked():
            yield json.dumps(big).encode()

        assert_error(await client.post("/v1/completions", content=chunked()), 413)
        metrics = (await client.get("/metrics")).text
        assert 'marble_requests_rejected_total{reason="too_large"} 2.0' in metrics


async def test_api_key(llada_tiny_path):
    async with serving(llada_tiny_path, Settings(api_key="sesame")) as (_, client):
        req = {"prompt": "a", "max_tokens": 2}
        assert_error(await client.post("/v1/completions", json=req), 401, "invalid_api_key")
        bad = {"Authorization": "Bearer wrong"}
        assert_error(await client.post("/v1/completions", json=req, headers=bad), 401)
        ok = {"Authorization": "Bearer sesame"}
        assert (await client.post("/v1/completions", json=req, headers=ok)).status_code == 200
        assert (await client.get("/health")).status_code == 200  # probes send no key
        assert (await client.get("/metrics")).status_code == 401  # model names and load
        assert (await client.get("/metrics", headers=ok)).status_code == 200


async def test_queue_full_is_429_with_retry_after(llada_tiny_path):
    async with serving(llada_tiny_path, max_queue=0) as (_, client):
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 0
        r = await client.post("/v1/diffusion/generate", json={"prompt": "a", "max_tokens": 2})
        assert_error(r, 429, "queue_full")
