"""How a model writes a tool call, read from its chat template: the Hermes form (a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, which Qwen-style
templates such as Dream's, SDAR's and LLaDA2's teach) or Gemma's (`<|tool_call>call:name{...}
<tool_call|>`, DiffusionGemma's). Each parses a model's text into calls and builds the grammar
that makes calls the only output. Knows nothing of tokenizers or HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from marble.structured.constraint import JSON_LAYOUT
from marble.structured.gemma_grammar import GemmaGrammar


@dataclass(frozen=True)
class Tool:
    """A function the client offers: its name, what it does, the JSON Schema of its
    arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class ToolFormat:
    """One way of writing calls. `open` is the text a call starts with: text before it is
    content, and a stream holds back what could still become it."""

    name = ""
    open = ""
    close = ""
    body = ""  # a regex for what stands between the marks (its groups go to `_call`)

    def parse(self, text: str, names: frozenset[str]) -> tuple[str, list[ParsedCall]]:
        """(the content before the first call, the well-formed calls of known tools)."""
        pattern = re.escape(self.open) + self.body + re.escape(self.close)
        calls = [self._call(match, names) for match in re.finditer(pattern, text, re.DOTALL)]
        content = text.split(self.open, 1)[0].strip()
        return content, [call for call in calls if call is not None]

    def _call(self, match: re.Match[str], names: frozenset[str]) -> ParsedCall | None:
        """The call one match holds, or None where it is malformed or of an unknown tool."""
        raise NotImplementedError

    def grammar(self, tools: list[Tool], parallel: bool, special: Callable[[str], bool]) -> str:
        """A Lark grammar whose matches are calls only. `special(text)`: whether `text` is
        one special token of the model's vocabulary, which a grammar must name as such rather
        than spell."""
        raise NotImplementedError

    def describe(self, tools: list[Tool]) -> str:
        """The instructions for a template that does not render `tools` itself."""
        raise NotImplementedError


class HermesFormat(ToolFormat):
    name = "hermes"
    open = "<tool_call>"
    close = "</tool_call>"
    body = r"\s*(.*?)\s*"

    def _call(self, match: re.Match[str], names: frozenset[str]) -> ParsedCall | None:
        return _json_call(match.group(1), names)

    def grammar(self, tools: list[Tool], parallel: bool, special: Callable[[str], bool]) -> str:
        alternatives = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = {"anyOf": alternatives, "x-guidance": JSON_LAYOUT}
        more = ' ("\\n" call)*' if parallel else ""
        opening, closing = _literal(self.open, special), _literal(self.close, special)
        return (
            f"start: call{more}\n"
            f'call: {opening} "\\n" body "\\n" {closing}\n'
            f"body: %json {json.dumps(schema)}\n"
        )

    def describe(self, tools: list[Tool]) -> str:
        listed = "\n".join(
            json.dumps(
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                },
                ensure_ascii=False,
            )
            for t in tools
        )
        return (
            "You can call these functions (JSON Schema signatures):\n"
            f"{listed}\n"
            "To call one, answer with a JSON object holding its name and arguments between "
            f'tags, one call per pair:\n{self.open}\n{{"name": "<function name>", '
            f'"arguments": {{<arguments>}}}}\n{self.close}'
        )


class GemmaFormat(ToolFormat):
    """`<|tool_call>call:name{key:value,...}<tool_call|>`, strings between `<|"|>` marks and
    keys bare (`gemma_grammar.py` builds its grammar)."""

    name = "gemma"
    open = "<|tool_call>"
    close = "<tool_call|>"
    body = r"call:([\w.-]+)(\{.*?\})"

    def grammar(self, tools: list[Tool], parallel: bool, special: Callable[[str], bool]) -> str:
        """Its marks are always special tokens (the form is Gemma's vocabulary's own)."""
        return GemmaGrammar().calls([(t.name, t.parameters) for t in tools], parallel)

    def _call(self, match: re.Match[str], names: frozenset[str]) -> ParsedCall | None:
        name, body = match.group(1), match.group(2)
        try:
            arguments, end = _GemmaValue(body).object(0)
        except ValueError:
            return None
        if end != len(body) or name not in names:
            return None
        return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def format_for_template(template: str) -> ToolFormat:
    """The form a template's assistant turns write calls in; the Hermes form where it shows
    none (it is then also what `describe` teaches)."""
    if GemmaFormat.open in template:
        return GemmaFormat()
    return HermesFormat()


def _literal(text: str, special: Callable[[str], bool]) -> str:
    return f"<{text[1:-1]}>" if special(text) else json.dumps(text)


def _json_call(body: str, names: frozenset[str]) -> ParsedCall | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class _GemmaValue:
    """A reader of Gemma's argument syntax: `{k:v,...}`, `[v,...]`, `<|"|>text<|"|>`, numbers,
    true, false and null."""

    QUOTE = '<|"|>'

    def __init__(self, text: str) -> None:
        self.text = text

    def value(self, at: int) -> tuple[Any, int]:
        text = self.text
        if text.startswith(self.QUOTE, at):
            end = text.find(self.QUOTE, at + len(self.QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            return text[at + len(self.QUOTE) : end], end + len(self.QUOTE)
        if text.startswith("{", at):
            return self.object(at)
        if text.startswith("[", at):
            items: list[Any] = []
            at += 1
            while not text.startswith("]", at):
                item, at = self.value(at)
                items.append(item)
                at = self._after_item(at, "]")
            return items, at + 1
        match = re.compile(r"[^,\]}]+").match(text, at)
        if match is None:
            raise ValueError(f"no value at {at}")
        word = match.group(0).strip()
        scalars = {"true": True, "false": False, "null": None}
        if word in scalars:
            return scalars[word], match.end()
        return json.loads(word), match.end()  # a number; anything else raises

    def object(self, at: int) -> tuple[dict[str, Any], int]:
        text = self.text
        if not text.startswith("{", at):
            raise ValueError(f"no object at {at}")
        result: dict[str, Any] = {}
        at += 1
        while not text.startswith("}", at):
            colon = text.find(":", at)
            if colon < 0:
                raise ValueError("a key without a value")
            key = text[at:colon].replace(self.QUOTE, "")
            result[key], at = self.value(colon + 1)
            at = self._after_item(at, "}")
        return result, at + 1

    def _after_item(self, at: int, closer: str) -> int:
        if self.text.startswith(",", at):
            return at + 1
        if self.text.startswith(closer, at):
            return at
        raise ValueError(f"expected ',' or {closer!r} at {at}")
