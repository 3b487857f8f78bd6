"""Structured output over HTTP: the official `openai` client's `.parse` helper gets an instance
of its pydantic model from a reference checkpoint, vLLM's guided fields work through
`extra_body`, and a malformed or doubled constraint is a 400 naming its field."""

from __future__ import annotations

import json

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.conftest import REFERENCE
from tests.server_helpers import serving

pytestmark = pytest.mark.anyio
LLADA = REFERENCE / "llada-tiny"


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    admin: bool


async def test_the_openai_client_parses_a_chat_into_its_model():
    async with serving(LLADA) as (_, client):
        api = AsyncOpenAI(base_url="http://marble/v1", api_key="unused", http_client=client)
        for seed in range(3):
            chat = await api.chat.completions.parse(
                model="marble",
                messages=[{"role": "user", "content": "Who is the admin?"}],
                response_format=Person,
                max_tokens=64,
                seed=seed,
                temperature=1.0,
            )
            choice = chat.choices[0]
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Person)
            assert Person.model_validate_json(choice.message.content) == choice.message.parsed


async def test_guided_fields_through_extra_body():
    async with serving(LLADA) as (_, client):
        api = AsyncOpenAI(base_url="http://marble/v1", api_key="unused", http_client=client)
        choice = await api.completions.create(
            model="marble",
            prompt="Answer:",
            max_tokens=16,
            extra_body={"guided_choice": ["red", "green", "blue"]},
        )
        assert choice.choices[0].text in {"red", "green", "blue"}
        regex = await api.completions.create(
            model="marble", prompt="Code:", max_tokens=16, extra_body={"guided_regex": "[A-Z]{3}"}
        )
        text = regex.choices[0].text
        assert len(text) == 3 and text.isupper()
        obj = await api.completions.create(
            model="marble",
            prompt="Data:",
            max_tokens=48,
            extra_body={"response_format": {"type": "json_object"}},
        )
        assert isinstance(json.loads(obj.choices[0].text), dict)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guided_regex": "((("}, "guided_regex"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "stop": ["x"]}, "stop"),
    ],
)
async def test_a_bad_constraint_is_a_400_naming_its_field(fields: dict, param: str):
    async with serving(LLADA) as (_, client):
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_a_match_cut_by_length_says_so_with_a_code():
    body = {"prompt": "x", "max_tokens": 8, "guided_regex": "a{200}"}
    async with serving(LLADA) as (_, client):
        whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        free = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8})
    assert (whole["finish_reason"], whole["error_code"]) == ("length", "constraint_incomplete")
    last = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"][-1]
    assert last["choices"][0]["error_code"] == "constraint_incomplete"
    assert "error_code" not in free.json()["choices"][0]
