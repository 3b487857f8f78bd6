"""No silent drops: every OpenAI request field Marble does not implement is refused by name
(a 400 whose `param` is the field) or accepted and ignored for a documented reason, and a
field OpenAI does not have is refused as unknown. The openai client's own parameter types
are the list of OpenAI's fields: a release that adds one fails here until it is decided."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import ParsedChatCompletionMessage
from openai.types.chat import chat_completion_message_param as message_params
from openai.types.chat import chat_completion_stream_options_param as stream_options_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.chat.parsed_function_tool_call import ParsedFunction, ParsedFunctionToolCall
from pydantic import BaseModel

from marble.server import openai_fields
from marble.server.openai_fields import Unsupported
from marble.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    StreamOptions,
    ToolCall,
    ToolCallFunction,
)
from tests.golden_cases import DG_CHECKPOINT
from tests.server_helpers import serving

pytestmark = pytest.mark.anyio
CLIENT_SIDE = {"extra_headers", "extra_query", "extra_body", "timeout"}
CHAT = [{"role": "user", "content": "hi"}]
# Each route with a body that is valid there, smallest work.
ROUTES = {
    "/v1/completions": {"prompt": "a", "max_tokens": 2},
    "/v1/chat/completions": {"messages": CHAT, "max_tokens": 2},
    "/v1/diffusion/generate": {"prompt": "a", "max_tokens": 2},
}
CHAT_ROUTE = "/v1/chat/completions"


def _openai_fields(*typed_dicts: Any) -> set[str]:
    return set().union(*(t.__annotations__ for t in typed_dicts)) - CLIENT_SIDE


# (openai's fields, the model that reads them, the tables of fields it does not implement)
COVERAGE: list[tuple[set[str], type[BaseModel], list[Mapping[str, Unsupported]]]] = [
    (
        _openai_fields(
            completion_params.CompletionCreateParamsStreaming,
            completion_params.CompletionCreateParamsNonStreaming,
        ),
        model,
        [openai_fields.SHARED, openai_fields.COMPLETIONS],
    )
    for model in (CompletionRequest, GenerateRequest)
] + [
    (
        _openai_fields(
            chat_params.CompletionCreateParamsStreaming,
            chat_params.CompletionCreateParamsNonStreaming,
        ),
        ChatCompletionRequest,
        [openai_fields.SHARED, openai_fields.CHAT],
    ),
    (
        # What a client sends, and what it got back and sends again as history.
        _openai_fields(*typing.get_args(message_params.ChatCompletionMessageParam))
        | set(ParsedChatCompletionMessage.model_fields),
        ChatMessage,
        [openai_fields.MESSAGE, openai_fields.RETURNED_MESSAGE],
    ),
    (
        # What `.parse` and `.stream` return for a call, which goes back as history.
        set(ParsedFunction.model_fields),
        ToolCallFunction,
        [openai_fields.PARSED_FUNCTION],
    ),
    (
        set(ParsedFunctionToolCall.model_fields) | {"index"},  # `.stream` keeps the index
        ToolCall,
        [openai_fields.STREAMED_TOOL_CALL],
    ),
    (
        _openai_fields(stream_options_params.ChatCompletionStreamOptionsParam),
        StreamOptions,
        [openai_fields.STREAM_OPTIONS],
    ),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with serving(DG_CHECKPOINT) as (_, c):
        yield c


def _refusal(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("fields,model,tables", COVERAGE, ids=lambda v: getattr(v, "__name__", ""))
def test_every_openai_field_is_read_or_decided(
    fields: set[str], model: type[BaseModel], tables: list[Mapping[str, Unsupported]]
) -> None:
    """Before: unknown fields were dropped, so no OpenAI field needed a decision."""
    assert fields, "the openai client's parameter types changed shape"
    assert model.model_config.get("extra") == "forbid"
    decided = set().union(*tables)
    undecided = fields - set(model.model_fields)
    assert not undecided, f"OpenAI fields {model.__name__} neither reads nor refuses/ignores"
    # A decision is a declared field, documented as such in the schema.
    properties = model.model_json_schema()["properties"]
    for table in tables:
        for name, entry in table.items():
            assert properties[name]["x-marble-unsupported"] == entry.verdict, name
            assert entry.reason in properties[name]["description"], name
    marked = {name for name, p in properties.items() if "x-marble-unsupported" in p}
    assert marked == decided


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("name", ["no_such_field", "with space", "top-k"])
async def test_an_unknown_field_is_refused_by_name(
    client: httpx.AsyncClient, path: str, name: str
) -> None:
    error = _refusal(await client.post(path, json={**ROUTES[path], name: 1}))
    assert error["param"] == name
    assert "not a supported field" in error["message"]


@pytest.mark.parametrize(
    "where,body",
    [
        ("messages.0.foo", {"messages": [{**CHAT[0], "foo": 1}]}),
        (
            "messages.0.content.0",
            {"messages": [{"role": "user", "content": [{"text": "a", "x": 1}]}]},
        ),
        ("stream_options.foo", {"messages": CHAT, "stream": True, "stream_options": {"foo": 1}}),
    ],
)
async def test_an_unknown_nested_field_is_refused_by_its_path(
    client: httpx.AsyncClient, where: str, body: dict[str, Any]
) -> None:
    assert _refusal(await client.post(CHAT_ROUTE, json=body))["param"] == where


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "name,value",
    [("logit_bias", {"50256": -100}), ("presence_penalty", 0.5), ("frequency_penalty", -1)],
)
async def test_a_sampling_control_marble_lacks_is_refused_unless_neutral(
    client: httpx.AsyncClient, path: str, name: str, value: Any
) -> None:
    error = _refusal(await client.post(path, json={**ROUTES[path], name: value}))
    assert error["param"] == name and "not supported" in error["message"]


@pytest.mark.parametrize("path", ROUTES)
async def test_neutral_values_and_ignored_fields_are_accepted(
    client: httpx.AsyncClient, path: str
) -> None:
    body = {
        **ROUTES[path],
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "user": "someone",
    }
    if path == CHAT_ROUTE:
        body |= {
            "tool_choice": "none",
            "tools": None,
            "store": True,
            "metadata": {"k": "v"},
            "service_tier": "auto",
            "parallel_tool_calls": False,
            "safety_identifier": "x",
        }
    else:
        body["best_of"] = 1
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "name,value",
    [("functions", [{"name": "f"}]), ("function_call", {"name": "f"})],
)
async def test_the_deprecated_functions_form_is_refused_by_name(
    client: httpx.AsyncClient, name: str, value: Any
) -> None:
    error = _refusal(await client.post(CHAT_ROUTE, json={**ROUTES[CHAT_ROUTE], name: value}))
    assert error["param"] == name and "send `tools`" in error["message"]


async def test_best_of_is_refused_on_completions(client: httpx.AsyncClient) -> None:
    body = {**ROUTES["/v1/completions"], "best_of": 3}
    assert _refusal(await client.post("/v1/completions", json=body))["param"] == "best_of"


async def test_messages_of_a_tool_call_exchange_validate(client: httpx.AsyncClient) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    r = await client.post(CHAT_ROUTE, json={**ROUTES[CHAT_ROUTE], "messages": messages})
    # The tiny model's template may or may not render a tool turn; the body itself is valid.
    assert r.status_code == 200 or not str(r.json()["error"]["param"]).startswith("messages")


async def test_the_schema_marks_refused_and_ignored_fields(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert chat["properties"]["functions"]["x-marble-unsupported"] == "refused"
    assert "x-marble-unsupported" not in chat["properties"]["tools"]
    assert chat["properties"]["store"]["x-marble-unsupported"] == "ignored"
    assert "stores" in chat["properties"]["store"]["description"]
    for name in ("CompletionRequest", "GenerateRequest"):
        assert schemas[name]["properties"]["logit_bias"]["x-marble-unsupported"] == "refused"
