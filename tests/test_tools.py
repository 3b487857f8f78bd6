"""Tool calls: each template's call form parses back what the template itself writes, a
required call decodes under a grammar that admits only calls of the offered tools, and the
official `openai` client runs a tool round trip (call, result, answer), whole and streamed,
on the reference checkpoints. Their contexts are widened for these tests: a template's tool
instructions alone run past 512 tokens of a 384-token vocabulary (rotary positions make any
length valid for random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import llguidance
import pytest
from openai import AsyncOpenAI

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.settlement import decode
from marble.server.openai_format import ChoiceState, OpenAIResponse
from marble.structured.constraint import Constraint
from marble.structured.tool_formats import GemmaFormat, HermesFormat, Tool
from marble.structured.tools import ToolPlan
from tests.conftest import REFERENCE
from tests.server_helpers import serving, tiny_engine

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
    {
        "type": "function",
        "function": {"name": "weather", "description": "a forecast", "parameters": WEATHER},
    },
]
SCHEMAS = {"add": ADD, "weather": WEATHER}
NAMES = frozenset(SCHEMAS)
HISTORY_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 2}'},
}


def widened(name: str, into: Path, context: int = 2048) -> Path:
    """A reference checkpoint with a longer context: its files linked, its config edited."""
    folder = into / name
    folder.mkdir()
    for f in (REFERENCE / name).iterdir():
        if f.name == "config.json":
            config = json.loads(f.read_text())
            for key in ("max_position_embeddings", "max_sequence_length"):
                if key in config:
                    config[key] = context
            (folder / f.name).write_text(json.dumps(config))
        else:
            (folder / f.name).symlink_to(f.resolve())
    return folder


def template_call(name: str) -> str:
    """The text a checkpoint's own template writes for an assistant turn holding one call."""
    tokenizer = TextTokenizer(REFERENCE / name)
    call = {
        **HISTORY_CALL,
        "function": {"name": "weather", "arguments": {"city": "Oslo", "days": 2}},
    }
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    return tokenizer.render_chat(messages, add_generation_prompt=False, tools=TOOLS)


def matches(name: str, constraint: Constraint, text: str) -> bool:
    """Whether `text`, tokenized by checkpoint `name`, is a complete match of `constraint`."""
    tokenizer = TextTokenizer(REFERENCE / name)
    llg = llguidance.LLTokenizer((REFERENCE / name / "tokenizer.json").read_text())
    matcher = llguidance.LLMatcher(llg, constraint.grammar(), log_level=0)
    ids = tokenizer.encode(text)
    if matcher.validate_tokens(ids) < len(ids):
        return False
    return bool(matcher.consume_tokens(ids)) and matcher.is_accepting()


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("name", ["dream-tiny", "sdar-tiny", "llada2-tiny"])
def test_the_hermes_form_parses_back_what_its_template_writes(name: str):
    _, calls = HermesFormat().parse(template_call(name), NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("weather", {"city": "Oslo", "days": 2})
    ]


def test_the_gemma_form_parses_back_what_diffusiongemmas_template_writes():
    text = template_call("diffusiongemma-tiny")
    assert GemmaFormat.open in text
    _, calls = GemmaFormat().parse(text, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("weather", {"city": "Oslo", "days": 2})
    ]


def test_gemma_values_of_every_kind_parse():
    body = 'call:add{a:-3,b:2.5,c:[1,<|"|>x, y<|"|>],d:{e:true,f:null}}'
    _, calls = GemmaFormat().parse(f"<|tool_call>{body}<tool_call|>", frozenset({"add"}))
    assert json.loads(calls[0].arguments) == {
        "a": -3,
        "b": 2.5,
        "c": [1, "x, y"],
        "d": {"e": True, "f": None},
    }


def test_content_before_calls_and_malformed_or_unknown_calls():
    text = (
        "Let me check.\n<tool_call>\n{not json}\n</tool_call>\n"
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    )
    content, calls = HermesFormat().parse(text, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]


def _plan(choice: str = "auto", parallel: bool = True) -> ToolPlan:
    tools = (Tool("add", "", ADD), Tool("weather", "", WEATHER))
    return ToolPlan(tools, choice, None, parallel, HermesFormat())  # type: ignore[arg-type]


def test_a_plan_keeps_one_call_unless_parallel_and_leaves_plain_text_alone():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert len(_plan(parallel=True).parse(f"{call}\n{call}")[1]) == 2
    content, calls = _plan(parallel=False).parse(f"{call}\n{call}")
    assert content is None and len(calls) == 1
    assert _plan().parse("just words") == ("just words", [])
    assert _plan().constraint(lambda _: False) is None  # "auto" decodes freely


@pytest.mark.parametrize("name, special", [("dream-tiny", True), ("llada2-tiny", False)])
def test_the_required_grammar_admits_calls_only(name: str, special: bool):
    """The marks are one special token where the vocabulary has them, spelled out where not."""
    tokenizer = TextTokenizer(REFERENCE / name)
    assert ("<tool_call>" in tokenizer.added_tokens) is special
    constraint = _plan("required").constraint(lambda t: t in tokenizer.added_tokens)
    assert constraint is not None and constraint.param == "tools"

    def accepts(text: str) -> bool:
        return matches(name, constraint, text)

    call = (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    )
    assert accepts(call)
    assert accepts(call + "\n" + call)
    assert not accepts(call.replace("weather", "whether"))  # no such tool
    assert not accepts(call.replace('"days": 2', '"days": 9'))  # not in its enum
    assert not accepts("Sure! " + call)  # a required call leaves no room for prose
    one = ToolPlan(_plan().tools, "required", None, False, HermesFormat())
    single = one.constraint(lambda t: t in tokenizer.added_tokens)
    assert single is not None
    assert matches(name, single, call) and not matches(name, single, call + "\n" + call)


# ---------------------------------------------------------------------------- over HTTP


def _valid_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name", ["llada-tiny", "dream-tiny", "sdar-tiny", "llada2-tiny", "diffusiongemma-tiny"]
)
async def test_a_required_call_round_trips_through_the_openai_client(name: str, tmp_path: Path):
    """llada-tiny's template ignores `tools` (Marble writes the instructions); the others
    render them and their own call form (DiffusionGemma's is Gemma's)."""
    user = [{"role": "user", "content": "Weather in Oslo?"}]
    async with serving(widened(name, tmp_path)) as (_, client):
        api = AsyncOpenAI(base_url="http://marble/v1", api_key="unused", http_client=client)
        for seed, choice in enumerate(
            ["required", {"type": "function", "function": {"name": "add"}}]
        ):
            chat = await api.chat.completions.create(
                model="marble",
                messages=user,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=choice,  # type: ignore[arg-type]
                max_tokens=160,
                seed=seed,
                temperature=1.0,
            )
            answer = chat.choices[0]
            assert answer.finish_reason == "tool_calls", answer
            calls = answer.message.tool_calls or []
            assert calls and answer.message.content is None
            for call in calls:
                _valid_call(call)
            if isinstance(choice, dict):
                assert [c.function.name for c in calls] == ["add"]
        # The call and its result go back; the model answers (free text: tool_choice none).
        history = [
            *user,
            {"role": "assistant", "content": None, "tool_calls": [HISTORY_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "rain"}'},
        ]
        reply = await api.chat.completions.create(
            model="marble",
            messages=history,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="none",
            max_tokens=8,
        )
        assert reply.choices[0].message.tool_calls is None
        assert reply.usage is not None and reply.usage.prompt_tokens > 0


@pytest.mark.anyio
async def test_a_streamed_call_arrives_whole_and_matches_the_unstreamed_one(tmp_path: Path):
    fields: dict[str, Any] = dict(
        model="marble",
        messages=[{"role": "user", "content": "Add 2 and 3"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=160,
        seed=7,
        temperature=1.0,
    )
    async with serving(widened("sdar-tiny", tmp_path)) as (_, client):
        api = AsyncOpenAI(base_url="http://marble/v1", api_key="unused", http_client=client)
        whole = (await api.chat.completions.create(**fields)).choices[0]
        deltas, finish = [], None
        async for chunk in await api.chat.completions.create(**fields, stream=True):
            for choice in chunk.choices:
                deltas += choice.delta.tool_calls or []
                finish = choice.finish_reason or finish
        async with api.chat.completions.stream(**fields) as stream:
            final = await stream.get_final_completion()
    assert finish == "tool_calls" and len(deltas) == 1
    streamed = deltas[0].function
    assert whole.message.tool_calls is not None
    expected = whole.message.tool_calls[0].function
    assert (streamed.name, streamed.arguments) == (expected.name, expected.arguments)
    assert final.choices[0].message.tool_calls is not None
    assert final.choices[0].message.tool_calls[0].function.arguments == expected.arguments


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # nothing to choose from
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools",
        ),
        ({"tools": TOOLS, "stream": True, "diffusing": True}, "diffusing"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {**HISTORY_CALL, "function": {"name": "add", "arguments": "[1]"}}
                        ],
                    },
                ]
            },
            "messages",
        ),
    ],
)
async def test_tools_that_cannot_be_served_are_a_400_naming_their_field(
    fields: dict[str, Any], param: str
):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    async with serving(REFERENCE / "llada-tiny") as (_, client):
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert str(r.json()["error"]["param"]).startswith(param)


def test_the_gemma_grammar_holds_arguments_to_their_schemas():
    tokenizer = TextTokenizer(REFERENCE / "diffusiongemma-tiny")
    optional = {
        "type": "object",
        "properties": {"x": {"type": "string"}, "y": {"type": "boolean"}, "z": {"type": "array"}},
        "required": ["y"],
    }
    tools = (Tool("add", "", ADD), Tool("weather", "", WEATHER), Tool("opt", "", optional))
    plan = ToolPlan(tools, "required", None, True, GemmaFormat())
    constraint = plan.constraint(lambda t: t in tokenizer.added_tokens)
    assert constraint is not None

    def accepts(text: str) -> bool:
        return matches("diffusiongemma-tiny", constraint, text)

    q = '<|"|>'
    assert accepts(f"<|tool_call>call:weather{{city:{q}Oslo{q},days:2}}<tool_call|>")
    assert accepts(
        template_call("diffusiongemma-tiny")
        .split("<|turn>model\n")[-1]
        .split("<|tool_response>")[0]
    )
    assert accepts(
        "<|tool_call>call:opt{y:true}<tool_call|><|tool_call>call:add{a:1,b:-2}<tool_call|>"
    )
    assert accepts(f"<|tool_call>call:opt{{x:{q}a{q},y:false,z:[{q}b{q}]}}<tool_call|>")
    assert not accepts(f"<|tool_call>call:weather{{city:{q}Oslo{q},days:9}}<tool_call|>")
    assert not accepts("<|tool_call>call:add{b:1,a:2}<tool_call|>")  # keys out of order
    assert not accepts("<|tool_call>call:opt{,y:true}<tool_call|>")
    assert not accepts(
        f"<|tool_call>call:weather{{city:{q}Oslo, a long way{q},days:2}}<tool_call|>"
    )
    with pytest.raises(ValueError, match="pattern"):
        pattern = {"type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}}
        ToolPlan((Tool("p", "", pattern),), "required", None, True, GemmaFormat()).constraint(
            lambda t: True
        )


def test_special_tokens_stay_in_the_text_when_asked():
    """Gemma's call marks are special tokens: its calls are parsed from text that keeps them
    (a chat with tools asks for that by default)."""
    engine = tiny_engine(REFERENCE / "llada-tiny")
    served = engine.served(None)
    special = served.special.eos
    ids = [*served.tokenizer.encode("ab"), special, *served.tokenizer.encode("cd")]
    texts = {}
    for keep in (False, True):
        request = engine.make_request("x", SamplingParams(skip_special_tokens=not keep))
        texts[keep] = decode(served, request, ids)
    assert texts[False] == "abcd"
    assert texts[True] == "ab" + served.tokenizer.decode([special], False) + "cd"


@pytest.mark.anyio
async def test_tools_a_template_cannot_render_are_a_400_naming_tools():
    """DiffusionGemma's template walks a tool's properties as a mapping: where they are not
    one, the template fails on the tools, not on the messages."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": "x"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "tools": tools}
    async with serving(REFERENCE / "diffusiongemma-tiny") as (_, client):
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def _stream_of(texts: list[str]) -> list[tuple[str, list[dict]]]:
    """What a streamed chat choice sends for a run of stable texts (the last one final)."""
    response = OpenAIResponse.__new__(OpenAIResponse)
    response.tools = _plan()
    state = ChoiceState(0, 0)
    sent = []
    for i, text in enumerate(texts):
        out = SimpleNamespace(text=text, finished=i == len(texts) - 1)
        sent.append(response._tool_delta(state, out))  # type: ignore[arg-type]
    return sent


def test_a_stream_holds_back_what_may_start_a_call_and_sends_each_call_once():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    sent = _stream_of(
        [
            "Sure",
            "Sure, let me <tool",
            f"Sure, let me {call[:30]}",
            f"Sure, let me {call}",
            f"Sure, let me {call}\n",
        ]
    )
    assert [text for text, _ in sent] == ["Sure", ", let me ", "", "", ""]
    calls = [c for _, cs in sent for c in cs]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert [bool(cs) for _, cs in sent] == [False, False, False, True, False]


def test_held_back_text_that_never_became_a_call_is_sent_as_content():
    sent = _stream_of(["x <tool", "x <tool_call> is not json", "x <tool_call> is not json."])
    assert "".join(text for text, _ in sent) == "x <tool_call> is not json."
    assert not any(cs for _, cs in sent)


def test_logprob_tokens_cut_at_a_stop_string_count_kept_special_tokens():
    """With special tokens kept in the text (tools), the tokens a stop-cut text covers are
    counted on text decoded the same way: before, a special token's text was left out of the
    count and every token, the stop string's included, was counted."""
    tokenizer = TextTokenizer(REFERENCE / "llada-tiny")
    special = tokenizer.special.eos
    assert special is not None
    ids = [*tokenizer.encode("ab"), special, *tokenizer.encode("cd STOP and more")]
    kept = tokenizer.decode(ids, False)
    response = OpenAIResponse.__new__(OpenAIResponse)
    response.tokenizer, response.skip_special_tokens = tokenizer, False
    out = SimpleNamespace(
        tokens=ids,
        completion_tokens=len(ids),
        finished=True,
        heal_text="",
        text=kept[: kept.index("STOP")],
    )
    counted = response._token_count(ChoiceState(0, 0), out)  # type: ignore[arg-type]
    covered = tokenizer.decode(ids[:counted], False)
    assert covered.startswith(out.text) and "STOP" not in covered
