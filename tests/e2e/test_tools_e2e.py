"""Structured output and tool calls against a real `python -m marble.server` (what `marble
serve` runs) on DiffusionGemma's reference checkpoint, through the official `openai` client's
own helpers: `.parse` into a pydantic model, and a tool round trip, streamed with `.stream`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import REFERENCE
from tests.e2e.conftest import running_server

pytestmark = pytest.mark.e2e
MODEL = "diffusiongemma-tiny"


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    admin: bool


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "the forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"enum": [1, 2, 3]}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with running_server(REFERENCE / "diffusiongemma-tiny") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    chat = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Who is the admin?"}],
        response_format=Person,
        max_tokens=64,
        seed=3,
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_a_tool_round_trip_streamed(client: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "Weather in Oslo?"}]
    with client.chat.completions.stream(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=96,
        seed=1,
    ) as stream:
        final = stream.get_final_completion()
    answer = final.choices[0]
    assert answer.finish_reason == "tool_calls"
    calls = answer.message.tool_calls or []
    assert [c.function.name for c in calls] == ["weather"] * len(calls) and calls
    arguments = json.loads(calls[0].function.arguments)
    assert set(arguments) == {"city", "days"} and arguments["days"] in (1, 2, 3)
    messages += [
        answer.message,  # as OpenAI's guide does it: the helper's parsed fields come back too
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"forecast": "rain"}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        max_tokens=16,  # type: ignore[list-item]
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
