"""Hostile input over HTTP: every size a client picks is bounded before anything proportional
to it is allocated, and bad values are a 400 in OpenAI's shape naming their field."""

from __future__ import annotations

import json
import resource
import statistics
import time

import pytest

from tests.server_helpers import serving

OVERSIZED = [
    {"max_tokens": 1_000_000_000},
    {"max_tokens": 100_000_000, "block_length": 1},
    {"max_tokens": 2**50, "block_length": 2**50},
    {"max_tokens": 2**70},
    {"max_tokens": 513},  # one past the tiny model's context of 512
    {"steps": 2**70},
    {"block_length": 2**70},
    {"draft_every": 2**70},
    {"top_k": 9223372036854775808},
    {"top_k": 385},  # past the tiny model's vocabulary
    {"seed": -1},
    {"seed": 2**63},
    {"n": 10**6},
    {"logprobs": 6},
    {"temperature": 1e308},
]
BAD_VALUES = [
    ({"prompt": [[False]]}, "prompt"),
    ({"prompt": [True, 3]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["ok", "\udfff"]}, "prompt"),
    ({"prompt": "hi", "suffix": "\ud800"}, "suffix"),
    ({"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "hi", "stop": ["x" * 257]}, "stop"),
    ({"prompt": "hi", "stop": [str(i) for i in range(17)]}, "stop"),
]


async def _post(client, path: str, body: dict):
    """JSON as a hostile client may send it: lone surrogates escaped (`\\ud800`), which
    httpx's own encoder would refuse to write."""
    headers = {"content-type": "application/json"}
    return await client.post(path, content=json.dumps(body), headers=headers)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _is_400(response, param: str | None = None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert (error["param"] or "").split(".")[0] == param, error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fields", OVERSIZED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items())
)
async def test_an_oversized_request_is_a_fast_400_with_rss_flat(llada_tiny_path, fields):
    """Before: max_tokens=1e9 built a billion-element canvas (16.9 GB, 47 s), 1e8 with blocks
    of 1 was OOM-killed, 2**70 never answered, top_k=2**63 failed its whole batch with 500."""
    body = {"prompt": "hi", **fields}
    async with serving(llada_tiny_path) as (_, client):
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})  # warm
        peak = _peak_rss_mb()
        latencies = []
        for path in ("/v1/completions", "/v1/diffusion/generate", "/v1/completions"):
            start = time.perf_counter()
            response = await client.post(path, json=body)
            latencies.append(time.perf_counter() - start)
            _is_400(response, next(iter(fields)))
        chat = {"messages": [{"role": "user", "content": "hi"}], **fields}
        _is_400(await client.post("/v1/chat/completions", json=chat))
        # Still serving everyone else.
        ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert ok.status_code == 200
    assert statistics.median(latencies) < 0.050
    assert _peak_rss_mb() - peak < 50  # nothing proportional to the number was allocated


@pytest.mark.anyio
@pytest.mark.parametrize("body,param", BAD_VALUES, ids=lambda v: repr(v)[:40])
async def test_bad_values_are_400_naming_their_field(llada_tiny_path, body, param):
    """Before: a lone surrogate was a 500, `[[false]]` was accepted as token id 0."""
    async with serving(llada_tiny_path) as (_, client):
        _is_400(await _post(client, "/v1/completions", body), param)


@pytest.mark.anyio
async def test_chat_content_with_a_lone_surrogate_is_400(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        for content in ("\ud800", [{"type": "text", "text": "a\udc00"}]):
            body = {"messages": [{"role": "user", "content": content}]}
            _is_400(await _post(client, "/v1/chat/completions", body), "messages")


@pytest.mark.anyio
async def test_a_huge_prompt_is_refused_without_tokenizing_it(llada_tiny_path, monkeypatch):
    """Before: a 4 MB prompt was tokenized on the event loop (/health froze 3.4 s)."""
    async with serving(llada_tiny_path) as (app, client):
        tokenizer = app.state.lifecycle.engine.served().tokenizer
        calls = []
        encode = tokenizer.encode
        monkeypatch.setattr(
            tokenizer, "encode", lambda text: calls.append(len(text)) or encode(text)
        )
        start = time.perf_counter()
        response = await client.post("/v1/completions", json={"prompt": "ab " * 1_300_000})
        elapsed = time.perf_counter() - start
        _is_400(response, "prompt")
        assert "context" in response.json()["error"]["message"]
        assert calls == []  # refused from its length alone
        assert elapsed < 0.5  # parsing the 4 MB body is the only work left
        # A prompt just within the bound is tokenized (off the event loop) and then measured.
        bound = 2 * 512 * tokenizer.max_token_chars
        response = await client.post("/v1/completions", json={"prompt": "a" * bound})
        _is_400(response, "prompt")
        assert calls == [bound]


@pytest.mark.anyio
async def test_steps_without_threshold_mean_the_same_offline_and_over_http(llada_tiny_path):
    """One meaning of `steps`: given without `threshold` it is the fixed-count rule, for the
    offline SamplingParams and for an HTTP body alike; an explicit threshold wins."""
    from marble.scheduler.sampling_params import SamplingParams

    assert SamplingParams(steps=8).threshold is None
    assert SamplingParams().replace(steps=8).threshold is None
    assert SamplingParams(steps=8, threshold=0.9).threshold == 0.9
    assert SamplingParams().threshold == 0.9
    async with serving(llada_tiny_path) as (_, client):
        body = {"prompt": "hi", "max_tokens": 16, "steps": 8, "block_length": 16}
        r = await client.post("/v1/diffusion/generate", json=body)
        queued = next(line for line in r.text.splitlines() if line.startswith("data: "))
        assert '"threshold":null' in queued and '"steps":8' in queued


def test_every_sampling_field_crosses_the_http_layer_by_its_name():
    """One shape: each SamplingParams field is a body field of the same name, and a body that
    sets them all gives exactly those settings (nothing dropped, renamed or re-derived)."""
    from marble.scheduler.sampling_params import SamplingParams
    from marble.server.protocol import ChatCompletionRequest, CompletionRequest

    chosen = {
        "max_tokens": 7,
        "steps": 5,
        "block_length": 4,
        "threshold": 0.5,
        "remasking": "margin",
        "schedule": "dream",
        "temperature": 0.3,
        "top_k": 3,
        "top_p": 0.8,
        "cfg_scale": 1.5,
        "seed": 11,
        "stop": ["x"],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "prefix_cache": False,
        "token_healing": True,
        "cache": "dual",
        "entropy_bound": 0.25,
        "t_min": 0.2,
        "t_max": 0.9,
        "stability_threshold": 2,
        "confidence_threshold": 0.01,
        "editing_threshold": 0.6,
        "max_post_steps": 3,
        "num_to_transfer": 2,
        "verify_threshold": 0.4,
    }
    assert set(chosen) == set(SamplingParams.field_names())
    for name in SamplingParams.field_names():
        assert name in CompletionRequest.model_fields and name in ChatCompletionRequest.model_fields
    params = CompletionRequest(prompt="x", **chosen).sampling_params(SamplingParams())
    assert params.to_dict() == chosen
    messages = [{"role": "user", "content": "x"}]
    chat = ChatCompletionRequest(messages=messages, **chosen).sampling_params(SamplingParams())
    assert chat.to_dict() == chosen


@pytest.mark.anyio
async def test_a_refusal_names_the_field_the_client_wrote(llada_tiny_path):
    """The 400's `param` comes from the validation that refused the value, under the name the
    body used (chat's `max_completion_tokens` is SamplingParams' `max_tokens`)."""
    messages = [{"role": "user", "content": "hi"}]
    async with serving(llada_tiny_path) as (_, client):
        for body, param in [
            ({"messages": messages, "max_completion_tokens": 0}, "max_completion_tokens"),
            ({"messages": messages, "max_tokens": 0}, "max_tokens"),
            ({"messages": messages, "top_p": 0}, "top_p"),
            ({"messages": messages, "remasking": "sideways"}, "remasking"),
        ]:
            _is_400(await _post(client, "/v1/chat/completions", body), param)
        _is_400(await _post(client, "/v1/completions", {"prompt": []}), "prompt")
        _is_400(await _post(client, "/v1/completions", {"prompt": ""}), "prompt")
