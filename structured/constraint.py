"""What a request's output must match, as the client stated it: a JSON Schema, any JSON
object, a regular expression, a choice among strings or a Lark/GBNF grammar, and the body
field it came from (errors name it). Knows nothing of tokenizers, models or HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
ANY_OBJECT = '{"type": "object"}'
# JSON as json.dumps writes it: no free whitespace, which a small model would spend its
# canvas on (a run of newlines is valid JSON).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """A constraint as text: equal texts compile once (`key`)."""

    kind: Kind
    source: str  # the schema as JSON, the regex, the choices as JSON, the grammar
    param: str  # the request field it came from, e.g. "response_format"

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> Constraint:
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON Schema is an object (or true/false)")
        return cls("json_schema", json.dumps(schema), param)  # its key order is the output's

    @classmethod
    def choice(cls, choices: list[str], param: str) -> Constraint:
        if not choices:
            raise ValueError("a choice needs at least one string")
        return cls("choice", json.dumps(choices), param)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form); raises ValueError where the text is not
        even well-formed (compiling it finds the rest)."""
        if self.kind in ("json_object", "json_schema"):
            schema = ANY_OBJECT if self.kind == "json_object" else self.source
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        if self.kind == "regex":
            return llguidance.grammar_from("regex", self.source)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.source)
        return llguidance.grammar_from("grammar", self.source)
