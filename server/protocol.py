"""Wire models: OpenAI request bodies plus Marble's diffusion extensions, and the error shape.

Pydantic lives here, at the edge; `to_sampling_params()` turns a body into the engine's
`SamplingParams`, merged over the checkpoint's serving defaults. Knows nothing of the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.request import SamplingParams

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

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Diffusion extensions (`extra_body` in the openai client).
    steps: Annotated[int, Field(ge=1)] | None = None
    block_length: Annotated[int, Field(ge=1)] | None = None
    threshold: float | None = None
    remasking: str | None = None
    schedule: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    cfg_scale: float | None = None
    ignore_eos: bool | None = None
    token_healing: bool | None = None
    diffusing: bool = False  # stream whole drafts (replace), Mercury-style
    draft_every: Annotated[int, Field(ge=0)] | None = None  # native `step` events: draft every k

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, defaults: SamplingParams, choice: int = 0) -> SamplingParams:
        """Given fields over the serving defaults; raises ValueError for invalid values.

        Choice k of a seeded request uses seed + k, so choices differ yet reproduce. Giving
        `steps` without `threshold` selects the fixed-step schedule; an explicit null
        `threshold` or `block_length` means "off" (one block for the whole completion).
        """
        given = {k: getattr(self, k) for k in _PARAM_FIELDS if getattr(self, k) is not None}
        max_tokens = self.max_new_tokens()
        if max_tokens is not None:
            given["max_tokens"] = max_tokens
        explicit = self.model_fields_set
        if "threshold" in explicit and self.threshold is None:
            given["threshold"] = None
        elif self.steps is not None and "threshold" not in explicit:
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


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingBody):
    prompt: Prompt
    suffix: str | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

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
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

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
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, defaults: SamplingParams, choice: int = 0) -> SamplingParams:
        """As for completions, but no token healing unless asked: a chat template's trailing
        newline is how the model saw every assistant turn begin, not a cut in the text."""
        params = super().to_sampling_params(defaults, choice)
        if self.token_healing is None:
            params = params.replace(token_healing=False)
        return params
