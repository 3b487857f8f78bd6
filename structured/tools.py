"""A chat request's tools and what it asks of them (`tool_choice`, `parallel_tool_calls`): the
constraint that makes calls the only output where a call is required, and the parse of a
finished text into content and calls. Knows nothing of HTTP or tokenizers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from marble.structured.constraint import Constraint
from marble.structured.tool_formats import ParsedCall, Tool, ToolFormat

Choice = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolCallOut:
    """A parsed call as the response carries it."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[Tool, ...]
    choice: Choice
    named: str | None  # the function a named choice forces
    parallel: bool
    format: ToolFormat

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls ("none": it is content, whatever it says)."""
        return self.choice != "none"

    def constraint(self, special: Callable[[str], bool]) -> Constraint | None:
        """For "required" and a named function: a grammar whose matches are calls, one or
        (with `parallel`) more, of the allowed tools; ValueError names a parameter schema the
        model's call form cannot hold to."""
        if self.choice not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.named in (None, t.name)]
        grammar = self.format.grammar(tools, self.parallel and self.named is None, special)
        return Constraint("grammar", grammar, "tools")

    def parse(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        """(content, calls) of a finished text: no calls leaves the whole text as content; at
        most one call unless `parallel`."""
        content, parsed = self.format.parse(text, frozenset(t.name for t in self.tools))
        if not parsed:
            return text, []
        if not self.parallel:
            parsed = parsed[:1]
        return (content or None), [_out(call) for call in parsed]


def _out(call: ParsedCall) -> ToolCallOut:
    return ToolCallOut(f"call_{uuid.uuid4().hex[:24]}", call.name, call.arguments)
