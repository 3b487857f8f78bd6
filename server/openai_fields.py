"""OpenAI's request fields that Marble does not implement, and what it does with each.

A field is refused by name (a 400) unless it holds a value OpenAI itself reads as "off" (null
always is), or it is accepted and ignored where ignoring changes nothing the client gets back;
each says why. A field in none of these tables and not in the body model is refused as unknown.
Knows nothing of pydantic or the routes (`marble.server.protocol` declares and checks these).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


def _null(value: Any) -> bool:
    return value is None


def _zero(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


def _one(value: Any) -> bool:
    return value is None or (type(value) is int and value == 1)


def _empty_object(value: Any) -> bool:
    return value is None or value == {}


def _empty_list(value: Any) -> bool:
    return value is None or value == []


def _none(value: Any) -> bool:
    return value is None or value == "none"


def _text_only(value: Any) -> bool:
    return value is None or value == ["text"]


@dataclass(frozen=True)
class Unsupported:
    """A field Marble does not implement: `ignored` (any value), or refused unless `neutral`
    holds for its value (the value that asks for nothing Marble lacks)."""

    verdict: Literal["refused", "ignored"]
    reason: str
    neutral: Callable[[Any], bool] = _null

    def check(self, value: Any) -> None:
        """Raise ValueError (a 400 naming the field) for a refused field's non-neutral value."""
        if self.verdict == "refused" and not self.neutral(value):
            raise ValueError(f"not supported by Marble: {self.reason}")


def refused(reason: str, neutral: Callable[[Any], bool] = _null) -> Unsupported:
    return Unsupported("refused", reason, neutral)


def ignored(reason: str) -> Unsupported:
    return Unsupported("ignored", reason)


_FUNCTIONS = "the deprecated `functions` form of tool calling is not implemented; send `tools`"
_NO_USERS = "Marble keeps no per-user record"

# Body fields of /v1/completions, /v1/diffusion/generate and /v1/chat/completions.
SHARED: Mapping[str, Unsupported] = {
    "frequency_penalty": refused(
        "repetition penalties are not implemented; only 0 is accepted", _zero
    ),
    "presence_penalty": refused(
        "repetition penalties are not implemented; only 0 is accepted", _zero
    ),
    "logit_bias": refused(
        "token biasing is not implemented; only an empty object is accepted", _empty_object
    ),
    "user": ignored(f"an end-user id for the caller's abuse tracking; {_NO_USERS}"),
}
# Body fields of /v1/completions and /v1/diffusion/generate only.
COMPLETIONS: Mapping[str, Unsupported] = {
    "best_of": refused(
        "server-side best-of is not implemented (ask for `n` choices and pick one); "
        "only 1 is accepted",
        _one,
    ),
}
# Body fields of /v1/chat/completions only.
CHAT: Mapping[str, Unsupported] = {
    "functions": refused(_FUNCTIONS, _empty_list),
    "function_call": refused(f'{_FUNCTIONS} and `tool_choice`; only "none" is accepted', _none),
    "audio": refused("audio output is not supported: Marble generates text only"),
    "modalities": refused('Marble generates text only; only ["text"] is accepted', _text_only),
    "reasoning_effort": refused(
        "reasoning effort is not implemented; switch a model's thinking on or off with "
        '`chat_template_kwargs` (e.g. {"enable_thinking": false}) where its template reads it'
    ),
    "verbosity": refused("verbosity control is not implemented"),
    "web_search_options": refused("web search is not implemented"),
    "moderation": refused("Marble runs no moderation of input or output"),
    "prediction": ignored(
        "a predicted output only speeds OpenAI up; the answer is the same without it"
    ),
    "store": ignored("Marble stores no completions: `store: true` stores nothing"),
    "metadata": ignored("Marble stores no completions, so there is nothing to tag"),
    "service_tier": ignored("Marble has one tier: every request is scheduled alike"),
    "prompt_cache_key": ignored(
        "a routing hint for OpenAI's prompt cache; Marble's cache needs no key"
    ),
    "prompt_cache_retention": ignored("Marble's prefix cache lives as the server configures it"),
    "prompt_cache_options": ignored("Marble's prefix cache lives as the server configures it"),
    "safety_identifier": ignored(f"an end-user id for abuse detection; {_NO_USERS}"),
}
# Fields of a chat message.
MESSAGE: Mapping[str, Unsupported] = {
    "refusal": refused("a refusal is not templated; send its text as `content`"),
    "audio": refused("audio is not supported: Marble serves text only"),
    "function_call": refused(f"{_FUNCTIONS} (and `tool_calls` for an earlier call)"),
}
# Fields the openai client's own `.parse` and `.stream` helpers add to what they return, which
# their users send back as history (`messages.append(completion.choices[0].message)`).
RETURNED_MESSAGE: Mapping[str, Unsupported] = {
    "parsed": ignored("the client's parse of `content`; the template reads `content` itself"),
    "annotations": ignored("citations of a web search's sources; Marble searches nothing"),
}
STREAMED_TOOL_CALL: Mapping[str, Unsupported] = {
    "index": ignored("a streamed call's place among the deltas; the list's order is the calls'"),
}
PARSED_FUNCTION: Mapping[str, Unsupported] = {
    "parsed_arguments": ignored(
        "the client's parse of `arguments`; the template reads `arguments` itself"
    ),
}
# Fields of `stream_options`.
STREAM_OPTIONS: Mapping[str, Unsupported] = {
    "include_obfuscation": ignored("Marble pads no stream chunks"),
}
