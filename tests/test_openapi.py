"""The OpenAPI document describes what the server sends: errors as 400 (never 422) with
OpenAI's error body, streams as text/event-stream, 200 bodies as built; and a body that is
missing or not a JSON object gets a 400 that says so."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from marble.server.app import create_app
from marble.server.protocol import error_body
from marble.server.settings import Settings
from tests.server_helpers import parse_sse, serving

POSTS = ("/v1/completions", "/v1/chat/completions", "/v1/diffusion/generate")
STREAMS = {
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/diffusion/generate"),
    ("get", "/v1/diffusion/requests/{request_id}/events"),
    ("get", "/v1/diffusion/events"),
}
ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app(Settings(served_model_name="tiny")).openapi()


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def test_no_422_anywhere(spec):
    text = json.dumps(spec)
    assert "422" not in text
    assert "HTTPValidationError" not in text


def test_every_error_response_is_the_openai_error_body(spec):
    for method, path, op in operations(spec):
        if method == "post":
            assert "400" in op["responses"], path
        for status, response in op["responses"].items():
            if status.startswith("2") or (path, status) == ("/health", "503"):
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (method, path, status)
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == set(error_body("x")["error"])


def test_limits_and_overload_are_documented(spec):
    for path in POSTS:
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "429", "503"} <= set(responses), path
        assert responses["429"]["headers"]["Retry-After"]["required"]
    assert "Retry-After" in spec["paths"]["/health"]["get"]["responses"]["503"]["headers"]


def test_streams_are_event_streams(spec):
    for method, path, op in operations(spec):
        content = op["responses"]["200"]["content"]
        assert ("text/event-stream" in content) == ((method, path) in STREAMS), path
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_model_field_names_the_served_model(spec):
    for name in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        field = spec["components"]["schemas"][name]["properties"]["model"]
        (text,) = [b for b in field["anyOf"] if b.get("type") == "string"]
        assert text["enum"] == ["tiny"]


@pytest.mark.anyio
async def test_empty_or_non_object_body_is_a_clear_400(llada_tiny_path):
    cases = [
        (b"", "empty"),
        (b"[1, 2]", "not an array"),
        (b'"hi"', "not a string"),
        (b"null", "not null"),
        (b"7", "not a number"),
    ]
    async with serving(llada_tiny_path) as (_, client):
        for path in POSTS:
            for content, words in cases:
                headers = {"content-type": "application/json"}
                r = await client.post(path, content=content, headers=headers)
                assert r.status_code == 400, (path, content, r.text)
                error = r.json()["error"]
                assert words in error["message"] and "None" not in error["message"], error
                assert error["param"] is None
            r = await client.post(
                path, content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}
            )
            assert r.status_code == 400
            assert "application/json" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_bodies_sent_match_their_documented_schemas(llada_tiny_path):
    async with serving(llada_tiny_path) as (app, client):
        spec = (await client.get("/openapi.json")).json()

        def check(r, method: str, path: str) -> None:
            response = spec["paths"][path][method]["responses"][str(r.status_code)]
            schema = response["content"][r.headers["content-type"].split(";")[0]]["schema"]
            full = {**schema, "components": spec["components"]}
            if r.headers["content-type"].startswith("text/event-stream"):  # schema per event
                events = parse_sse(r.text)
                assert events
                for e in events:
                    fields = {"event": e.event, "id": e.id, "data": e.data}
                    jsonschema.validate({k: v for k, v in fields.items() if v is not None}, full)
            else:
                jsonschema.validate(r.json(), full)

        fixed = {"max_tokens": 4, "steps": 2, "block_length": 4, "logprobs": 1}
        r = await client.post("/v1/completions", json={"prompt": "a", **fixed})
        check(r, "post", "/v1/completions")
        chat = {"messages": [{"role": "user", "content": "hi"}], **fixed, "logprobs": True}
        check(await client.post("/v1/chat/completions", json=chat), "post", "/v1/chat/completions")
        stream = await client.post("/v1/completions", json={"prompt": "a", "stream": True})
        check(stream, "post", "/v1/completions")
        native = await client.post("/v1/diffusion/generate", json={"prompt": "a", **fixed})
        check(native, "post", "/v1/diffusion/generate")
        check(await client.get("/v1/models"), "get", "/v1/models")
        check(await client.get("/v1/models/nope"), "get", "/v1/models/{model}")
        check(await client.get("/health"), "get", "/health")
        check(await client.get("/live"), "get", "/live")
        check(await client.post("/v1/completions", content=b""), "post", "/v1/completions")


def test_sampling_ranges_in_the_schema_are_the_ones_enforced(spec):
    """The schema shows SamplingParams' own range table, which is what refuses a value."""
    from marble.scheduler.sampling_params import RANGES

    for name in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        properties = spec["components"]["schemas"][name]["properties"]
        for field, (low, high, open_low) in RANGES.items():
            prop = properties[field]
            # (2**63 - 1 leaves the schema as a float: compare as floats)
            assert float(prop["maximum"]) == float(high), (name, field)
            assert prop["exclusiveMinimum" if open_low else "minimum"] == low, (name, field)
