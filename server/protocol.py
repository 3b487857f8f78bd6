"""Wire models: OpenAI request bodies plus Marble's diffusion extensions, and the error shape.

Pydantic lives here, at the edge, and checks what JSON can get wrong (types, the HTTP-only
fields such as `n`). The fields that are `SamplingParams` fields keep its names; their ranges
are documented in the schema from `SamplingParams`' own table and checked once, by
`SamplingParams`, whose refusal names the field. `sampling_params()` is the one conversion.
Knows nothing of the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    model_validator,
)

from marble.scheduler.sampling_params import (
    MAX_STEPS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS,
    RANGES,
    InvalidParam,
    SamplingParams,
)
from marble.server.openai_fields import (
    CHAT,
    COMPLETIONS,
    MESSAGE,
    PARSED_FUNCTION,
    RETURNED_MESSAGE,
    SHARED,
    STREAM_OPTIONS,
    STREAMED_TOOL_CALL,
    Unsupported,
)
from marble.server.structured_body import StructuredFields
from marble.structured.tool_formats import Tool, ToolFormat
from marble.structured.tools import ToolPlan

MAX_N = 1024  # choices per request: the server's own limit (`max_n`) is at most this
MAX_TOKEN_ID = 1 << 31  # ids beyond any vocabulary; the engine checks the model's own
MAX_MESSAGES = 4096  # chat turns per request
MAX_TEMPLATE_KWARGS = 64  # entries of `chat_template_kwargs`
MAX_TOOLS = 128  # functions per request, as OpenAI allows


def _unicode(text: str) -> str:
    """JSON may carry a lone surrogate (\\ud800), which no tokenizer or UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from exc
    return text


def _template_kwargs(value: Any) -> Any:
    if isinstance(value, dict) and len(value) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} entries")
    return value


# Every string a client sends that reaches the tokenizer or comes back in a response.
Text = Annotated[str, AfterValidator(_unicode)]
# Token ids and counts are JSON integers: true, 1.5 or "3" are refused, not coerced.
TokenId = Annotated[int, Strict(), Field(ge=0, lt=MAX_TOKEN_ID)]
Count = Annotated[int, Strict()]
# A list stops at its first bad item: the cost of refusing a body must not grow with the
# number of bad items in it (a million of them made a million errors, 1.3 GB to describe).
FAIL_FAST = Field(fail_fast=True)


def _sampling(name: str) -> Any:
    """A `SamplingParams` field, unset by default; its range is shown in the schema and
    checked by `SamplingParams`."""
    low, high, open_low = RANGES[name]
    return Field(
        None,
        json_schema_extra={
            "exclusiveMinimum" if open_low else "minimum": low,
            "maximum": high,
        },
    )


def _unsupported_type(table: Mapping[str, Unsupported]) -> Any:
    """The type of an OpenAI field Marble does not implement: any value, then `table`'s
    check by the field's name (a refusal names the field)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        table[str(info.field_name)].check(value)
        return value

    return Annotated[Any, AfterValidator(check)]


def _unsupported(table: Mapping[str, Unsupported], name: str) -> Any:
    """Unset by default; the schema says whether the field is refused or ignored, and why."""
    entry = table[name]
    return Field(
        None,
        description=f"{entry.verdict} by Marble: {entry.reason}",
        json_schema_extra={"x-marble-unsupported": entry.verdict},
    )


SharedUnsupported = _unsupported_type(SHARED)
CompletionsUnsupported = _unsupported_type(COMPLETIONS)
ChatUnsupported = _unsupported_type(CHAT)
MessageUnsupported = _unsupported_type(MESSAGE)


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = _unsupported(STREAM_OPTIONS, "include_obfuscation")


class SamplingBody(StructuredFields):
    """Fields shared by completions, chat and native generate. A field no body declares is
    refused by name, never dropped: OpenAI's that Marble lacks are declared, refused or
    ignored as `marble.server.openai_fields` says."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    n: Annotated[Count, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = _unsupported(SHARED, "user")
    frequency_penalty: SharedUnsupported = _unsupported(SHARED, "frequency_penalty")
    presence_penalty: SharedUnsupported = _unsupported(SHARED, "presence_penalty")
    logit_bias: SharedUnsupported = _unsupported(SHARED, "logit_bias")
    diffusing: bool = False  # stream whole drafts (replace), Mercury-style
    # Native `step` events carry the full draft every k steps (0: never).
    draft_every: Annotated[Count, Field(ge=0, le=MAX_STEPS)] | None = None
    # SamplingParams' fields, by its names (diffusion ones through `extra_body` in the openai
    # client). Unset or null: the serving default, except where null is itself a setting.
    max_tokens: Count | None = _sampling("max_tokens")
    temperature: float | None = _sampling("temperature")
    top_p: float | None = _sampling("top_p")
    stop: Text | Annotated[list[Text], FAIL_FAST] | None = Field(
        None,
        description=f"up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
    )
    seed: Count | None = _sampling("seed")
    steps: Count | None = _sampling("steps")
    block_length: Count | None = _sampling("block_length")
    threshold: float | None = _sampling("threshold")
    remasking: str | None = None
    schedule: str | None = None
    top_k: Count | None = _sampling("top_k")
    cfg_scale: float | None = _sampling("cfg_scale")
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    prefix_cache: bool | None = None
    token_healing: bool | None = None
    cache: str | None = None
    entropy_bound: float | None = _sampling("entropy_bound")
    t_min: float | None = _sampling("t_min")
    t_max: float | None = _sampling("t_max")
    stability_threshold: Count | None = _sampling("stability_threshold")
    confidence_threshold: float | None = _sampling("confidence_threshold")
    editing_threshold: float | None = _sampling("editing_threshold")
    max_post_steps: Count | None = _sampling("max_post_steps")
    num_to_transfer: Count | None = _sampling("num_to_transfer")
    verify_threshold: float | None = _sampling("verify_threshold")

    # An explicit null here means "off" (one block; no threshold; no edits or remasks), not
    # the default.
    NULL_IS_A_SETTING: ClassVar[tuple[str, ...]] = (
        "threshold",
        "block_length",
        "editing_threshold",
        "verify_threshold",
    )

    def sampling_fields(self) -> dict[str, Any]:
        """The `SamplingParams` fields this body sets."""
        given = {
            name: getattr(self, name)
            for name in SamplingParams.field_names()
            if getattr(self, name) is not None
            or (name in self.NULL_IS_A_SETTING and name in self.model_fields_set)
        }
        if isinstance(self.stop, str):
            given["stop"] = (self.stop,)
        return given

    def param_name(self, field: str | None) -> str | None:
        """The body field a `SamplingParams` field came from."""
        return field

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        """The body's settings over the serving defaults, validated (once) by SamplingParams:
        an `InvalidParam` names the body's field."""
        try:
            return defaults.replace(**self.sampling_fields())
        except InvalidParam as exc:
            raise InvalidParam(self.param_name(exc.param), str(exc)) from exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# Several prompts are several choices, which `n`'s ceiling bounds too; none is not a prompt.
# No prompt is longer than the longest context there is.
Prompt = (
    Text
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_N), FAIL_FAST]
    | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS), FAIL_FAST]
    | Annotated[
        list[Annotated[list[TokenId], Field(max_length=MAX_TOKENS), FAIL_FAST]],
        Field(min_length=1, max_length=MAX_N),
        FAIL_FAST,
    ]
)


class CompletionRequest(SamplingBody):
    prompt: Prompt
    suffix: Text | None = None
    echo: bool = False
    logprobs: Annotated[Count, Field(ge=0, le=5)] | None = None
    best_of: CompletionsUnsupported = _unsupported(COMPLETIONS, "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class GenerateRequest(CompletionRequest):
    """`POST /v1/diffusion/generate`: the completions body, streamed as native events."""


class ContentPart(BaseModel):
    """A part of a message's content. Only text parts are served (`ChatMessage.to_template`
    refuses the others by type); a text part holds `type` and `text` only."""

    model_config = ConfigDict(extra="allow")

    type: str = "text"
    text: Text | None = None

    @model_validator(mode="after")
    def _text_fields_only(self) -> ContentPart:
        if self.type == "text" and self.model_extra:
            name = next(iter(self.model_extra))[:64]
            raise ValueError(f"{name!r} is not a field of a text part (only type and text are)")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text
    arguments: Text
    parsed_arguments: Any = _unsupported(PARSED_FUNCTION, "parsed_arguments")


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as OpenAI writes it."""

    model_config = ConfigDict(extra="forbid")

    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: Any = _unsupported(STREAMED_TOOL_CALL, "index")

    def to_template(self) -> dict[str, Any]:
        """The call with its arguments as an object, which templates write out (`tojson`) or
        walk key by key; OpenAI sends them as JSON text."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(
                f"tool call {self.id!r}: function.arguments must be a JSON object, as text"
            )
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": arguments},
        }


# A function's name, as OpenAI restricts it.
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments are decoded under their schema whenever constrained

    @model_validator(mode="after")
    def _arguments_are_an_object(self) -> FunctionDefinition:
        kind = (self.parameters or {}).get("type", "object")
        if kind != "object":
            raise ValueError(f"parameters describes the arguments, an object: not type {kind!r}")
        return self


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ToolName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[ContentPart], FAIL_FAST] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_MESSAGES), FAIL_FAST] | None = None
    tool_call_id: Text | None = None
    refusal: MessageUnsupported = _unsupported(MESSAGE, "refusal")
    audio: MessageUnsupported = _unsupported(MESSAGE, "audio")
    function_call: MessageUnsupported = _unsupported(MESSAGE, "function_call")
    parsed: Any = _unsupported(RETURNED_MESSAGE, "parsed")
    annotations: Any = _unsupported(RETURNED_MESSAGE, "annotations")

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise ValueError(
                    f"content parts of type {sorted(kinds)} are not supported: Marble serves "
                    "text prompts only (image and audio inputs are not supported)"
                )
            content = "".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES), FAIL_FAST]
    max_completion_tokens: Count | None = _sampling("max_tokens")
    logprobs: bool = False
    top_logprobs: Annotated[Count, Field(ge=0, le=20)] | None = None
    # Variables for the chat template, as vLLM takes them (e.g. {"enable_thinking": true}).
    # Its size is checked before its values, which would each make an error.
    chat_template_kwargs: (
        Annotated[dict[str, bool | int | float | Text | None], BeforeValidator(_template_kwargs)]
        | None
    ) = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS), FAIL_FAST] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: ChatUnsupported = _unsupported(CHAT, "functions")
    function_call: ChatUnsupported = _unsupported(CHAT, "function_call")
    audio: ChatUnsupported = _unsupported(CHAT, "audio")
    modalities: ChatUnsupported = _unsupported(CHAT, "modalities")
    reasoning_effort: ChatUnsupported = _unsupported(CHAT, "reasoning_effort")
    verbosity: ChatUnsupported = _unsupported(CHAT, "verbosity")
    web_search_options: ChatUnsupported = _unsupported(CHAT, "web_search_options")
    moderation: ChatUnsupported = _unsupported(CHAT, "moderation")
    prediction: ChatUnsupported = _unsupported(CHAT, "prediction")
    store: ChatUnsupported = _unsupported(CHAT, "store")
    metadata: ChatUnsupported = _unsupported(CHAT, "metadata")
    service_tier: ChatUnsupported = _unsupported(CHAT, "service_tier")
    prompt_cache_key: ChatUnsupported = _unsupported(CHAT, "prompt_cache_key")
    prompt_cache_retention: ChatUnsupported = _unsupported(CHAT, "prompt_cache_retention")
    prompt_cache_options: ChatUnsupported = _unsupported(CHAT, "prompt_cache_options")
    safety_identifier: ChatUnsupported = _unsupported(CHAT, "safety_identifier")

    def sampling_fields(self) -> dict[str, Any]:
        """As for completions, but no token healing unless asked: a chat template's trailing
        newline is how the model saw every assistant turn begin, not a cut in the text. With
        tools to call, special tokens stay in the text the calls are parsed from."""
        given = super().sampling_fields()
        if self.max_completion_tokens is not None:
            given["max_tokens"] = self.max_completion_tokens
        if self.token_healing is None:
            given["token_healing"] = False
        if self.skip_special_tokens is None and self.tools and self.tool_choice != "none":
            given["skip_special_tokens"] = False  # a call's marks may be special tokens
        return given

    def param_name(self, field: str | None) -> str | None:
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return field

    def tool_plan(self, form: ToolFormat) -> ToolPlan | None:
        """What the body asks of its tools, written in `form` (None: no tools); raises
        InvalidParam for a choice the tools cannot meet."""
        tools = [
            Tool(
                t.function.name,
                t.function.description or "",
                t.function.parameters if t.function.parameters is not None else _NO_ARGUMENTS,
            )
            for t in self.tools or []
        ]
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InvalidParam("tools", f"the function {twice!r} is listed twice")
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if not tools:
            if choice not in (None, "none"):
                raise InvalidParam("tool_choice", "tool_choice needs tools to choose from")
            return None
        if named is not None and named not in names:
            raise InvalidParam("tool_choice", f"tool_choice names {named!r}, which is no tool")
        if choice not in (None, "none", "auto") and self.constraint() is not None:
            raise InvalidParam(
                "tool_choice",
                "a required tool call and a structured-output constraint cannot both shape "
                "the output; send one of them",
            )
        if self.stream and self.diffusing and choice != "none":
            raise InvalidParam(
                "diffusing",
                "a diffusing stream sends whole drafts as content; tool calls are parsed from "
                "stable text: stream with diffusing false (or tool_choice none)",
            )
        return ToolPlan(
            tools=tuple(tools),
            choice="named" if named is not None else (choice or "auto"),  # type: ignore[arg-type]
            named=named,
            parallel=self.parallel_tool_calls is not False,
            format=form,
        )


_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
