"""The request fields that ask for structured output: OpenAI's `response_format` (`text`,
`json_object`, `json_schema`), and vLLM's names for the rest (`guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`, or all of them as `structured_outputs`). A body sets at
most one; `constraint()` turns it into the `Constraint` the engine compiles. Knows nothing of
grammars beyond that.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from marble.scheduler.sampling_params import InvalidParam
from marble.structured.constraint import Constraint


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly: strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object: one of its fields."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StructuredFields(BaseModel):
    """The fields; a request body class inherits them."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> Constraint | None:
        """The one constraint the body asks for (None: free text); InvalidParam names the
        field of a malformed one, or the second of two."""
        found: list[Constraint] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Constraint("json_object", "", "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidParam(
                    "response_format", "response_format json_schema needs json_schema.schema"
                )
            found.append(Constraint.json_schema(rf.json_schema.schema_, "response_format"))
        so = self.structured_outputs
        sources = [
            ("guided_json", self.guided_json, "json"),
            ("guided_regex", self.guided_regex, "regex"),
            ("guided_choice", self.guided_choice, "choice"),
            ("guided_grammar", self.guided_grammar, "grammar"),
        ]
        if so is not None:
            sources += [
                ("structured_outputs", so.json_, "json"),
                ("structured_outputs", so.regex, "regex"),
                ("structured_outputs", so.choice, "choice"),
                ("structured_outputs", so.grammar, "grammar"),
            ]
        for param, value, kind in sources:
            if value is not None:
                found.append(_constraint(param, value, kind))
        if len(found) > 1:
            raise InvalidParam(
                found[1].param, "a request takes one structured-output constraint at most"
            )
        return found[0] if found else None


def _constraint(param: str, value: Any, kind: str) -> Constraint:
    """A constraint of `kind` from a field's value (a schema may come as JSON text)."""
    try:
        if kind == "json":
            return Constraint.json_schema(
                json.loads(value) if isinstance(value, str) else value, param
            )
        if kind == "choice":
            return Constraint.choice(value, param)
    except ValueError as exc:
        raise InvalidParam(param, f"{param}: {exc}") from exc
    return Constraint("regex" if kind == "regex" else "grammar", value, param)
