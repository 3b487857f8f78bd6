"""Wire models: OpenAI request bodies plus Marble's diffusion extensions, and the error shape.

Pydantic lives here, at the edge; `to_sampling_params()` turns a body into the engine's
`SamplingParams`, merged over the checkpoint's serving defaults. Knows nothing of the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from marble.scheduler.request import (
    MAX_STEPS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS,
    MAX_TOP_K,
    SEED_LIMIT,
    SamplingParams,
)

MAX_N = 1024  # choices per request: the server's own limit (`max_n`) is at most this
MAX_TOKEN_ID = 1 << 31  # ids beyond any vocabulary; the engine checks the model's own


def _unicode(text: str) -> str:
    """JSON may carry a lone surrogate (\\ud800), which no tokenizer or UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from exc
    return text


# Every string a client sends that reaches the tokenizer or comes back in a response.
Text = Annotated[str, AfterValidator(_unicode)]
# Token ids and counts are JSON integers: true, 1.5 or "3" are refused, not coerced.
TokenId = Annotated[int, Strict(), Field(ge=0, lt=MAX_TOKEN_ID)]
Count = Annotated[int, Strict()]
Number = Annotated[float, Field(allow_inf_nan=False)]
StopStrings = Annotated[
    list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_STOP_STRINGS),
]

# Body fields that map one-to-one onto SamplingParams.
_PARAM_FIELDS = (
    "max_tokens",
    "steps",
    "block_length",
    "threshold",
    "remasking",
    "schedule",
    "temperature",
    "top_k",
    "top_p",
    "cfg_scale",
    "seed",
    "ignore_eos",
    "token_healing",
)


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """Fields shared by completions, chat and native generate."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: Annotated[Count, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=100)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[Count, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)] | StopStrings | None = (
        None
    )
    seed: Annotated[Count, Field(ge=0, lt=SEED_LIMIT)] | None = None
    user: Text | None = None
    # Diffusion extensions (`extra_body` in the openai client).
    steps: Annotated[Count, Field(ge=1, le=MAX_STEPS)] | None = None
    block_length: Annotated[Count, Field(ge=1, le=MAX_TOKENS)] | None = None
    threshold: Annotated[Number, Field(ge=0, le=1)] | None = None
    remasking: str | None = None
    schedule: str | None = None
    top_k: Annotated[Count, Field(ge=0, le=MAX_TOP_K)] | None = None
    cfg_scale: Annotated[Number, Field(ge=0, le=100)] | None = None
    ignore_eos: bool | None = None
    token_healing: bool | None = None
    diffusing: bool = False  # stream whole drafts (replace), Mercury-style
    # Native `step` events carry the full draft every k steps (0: never).
    draft_every: Annotated[Count, Field(ge=0, le=MAX_STEPS)] | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, defaults: SamplingParams, choice: int = 0) -> SamplingParams:
        """Given fields over the serving defaults; raises ValueError for invalid values.

        Choice k of a seeded request uses seed + k, so choices differ yet reproduce. Giving
        `steps` without `threshold` selects the fixed-step schedule (SamplingParams' own
        rule); an explicit null `threshold` or `block_length` means "off" (one block for the
        whole completion).
        """
        given = {k: getattr(self, k) for k in _PARAM_FIELDS if getattr(self, k) is not None}
        max_tokens = self.max_new_tokens()
        if max_tokens is not None:
            given["max_tokens"] = max_tokens
        explicit = self.model_fields_set
        if "threshold" in explicit and self.threshold is None:
            given["threshold"] = None
        if "block_length" in explicit and self.block_length is None:
            given["block_length"] = None
        if self.stop is not None:
            given["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.seed is not None:
            given["seed"] = (self.seed + choice) % 2**63
        return defaults.replace(**given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# Several prompts are several choices, which `n`'s ceiling bounds too.
Prompt = (
    Text
    | Annotated[list[Text], Field(max_length=MAX_N)]
    | list[TokenId]
    | Annotated[list[list[TokenId]], Field(max_length=MAX_N)]
)


class CompletionRequest(SamplingBody):
    prompt: Prompt
    suffix: Text | None = None
    echo: bool = False
    logprobs: Annotated[Count, Field(ge=0, le=5)] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class GenerateRequest(CompletionRequest):
    """`POST /v1/diffusion/generate`: the completions body, streamed as native events."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Count, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[Count, Field(ge=0, le=20)] | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, defaults: SamplingParams, choice: int = 0) -> SamplingParams:
        """As for completions, but no token healing unless asked: a chat template's trailing
        newline is how the model saw every assistant turn begin, not a cut in the text."""
        params = super().to_sampling_params(defaults, choice)
        if self.token_healing is None:
            params = params.replace(token_healing=False)
        return params
