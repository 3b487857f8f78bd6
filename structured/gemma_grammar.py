"""A Lark grammar for calls in Gemma's form, `<|tool_call>call:name{key:value,...}<tool_call|>`,
arguments held to their JSON Schemas: keys in sorted order as Gemma's template writes them
(required ones always, optional ones or not), strings between `<|"|>` marks, numbers, booleans
and null as JSON writes them (their schemas compile as JSON), lists and nested objects. What
the translation does not cover (`anyOf`, `$ref`, `pattern`, item counts, ...) raises ValueError
naming it. Knows nothing of tokenizers.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Schema keys a translated schema may hold beside what each type reads: they only describe.
_DESCRIPTIVE = {"description", "title", "examples", "default", "$comment", "nullable"}
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JSON_SCALAR_KEYS = {
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "null": set(),
}


class GemmaGrammar:
    """Builds the rules one by one (`rule` names them r0, r1, ...)."""

    QUOTE = '<|"|>'

    def __init__(self) -> None:
        self.rules: list[str] = []

    def calls(self, tools: list[tuple[str, dict[str, Any]]], parallel: bool) -> str:
        """The grammar: one call of any of `tools` (name, parameters schema), or several
        one after another with `parallel`."""
        names = [self.rule(f'"call:{name}" {self.object(schema, name)}') for name, schema in tools]
        call = self.rule(f"<|tool_call> ({' | '.join(names)}) <tool_call|>")
        return "\n".join([f"start: {call}{'+' if parallel else ''}", *self.rules]) + "\n"

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, schema: Any, where: str) -> str:
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema here must be an object")
        if "enum" in schema or "const" in schema:
            return self.choice(schema, where)
        kind = schema.get("type")
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        if kind == "string":
            return self.string(schema, where)
        if kind in _JSON_SCALAR_KEYS:
            _only(schema, _JSON_SCALAR_KEYS[kind] | {"type"}, where)
            return self.rule(f"%json {json.dumps(schema)}")
        raise ValueError(f"{where}: type {kind!r} is not decoded in Gemma's call form")

    def object(self, schema: dict[str, Any], where: str) -> str:
        _only(schema, {"type", "properties", "required", "additionalProperties"}, where)
        properties = schema.get("properties", {})
        if schema.get("type", "object") != "object" or not isinstance(properties, dict):
            raise ValueError(f"{where}: arguments must be an object with properties")
        required = set(schema.get("required", []))
        keys = sorted(properties)
        for key in keys:
            if not _PLAIN_KEY.match(key):
                raise ValueError(f"{where}: the key {key!r} is not a plain name")
        items = [f'"{key}:" {self.value(properties[key], f"{where}.{key}")}' for key in keys]
        # From item i on: `first` where nothing is written yet, `lead` after an item (a comma
        # first); None: nothing is left to write.
        first: str | None = None
        lead: str | None = None
        for i in reversed(range(len(keys))):
            here, after = _seq(items[i], lead), _seq('","', items[i], lead)
            if keys[i] in required:
                first, lead = self.rule(here), self.rule(after)
            else:
                first = self.rule(f"({here}) | {first}" if first else f"({here})?")
                lead = self.rule(f"({after}) | {lead}" if lead else f"({after})?")
        return self.rule(_seq('"{"', first, '"}"'))

    def array(self, schema: dict[str, Any], where: str) -> str:
        _only(schema, {"type", "items"}, where)
        item = self.value(schema.get("items", {"type": "string"}), f"{where}[]")
        return self.rule(f'"[" ({item} ("," {item})*)? "]"')

    def string(self, schema: dict[str, Any], where: str) -> str:
        _only(schema, {"type", "minLength", "maxLength"}, where)
        low, high = schema.get("minLength", 0), schema.get("maxLength", "")
        # No `<` inside: the text `<|"|>` would end the string when the call is read back.
        return self.rule(f'<|"|> /[^<]{{{low},{high}}}/ <|"|>')

    def choice(self, schema: dict[str, Any], where: str) -> str:
        _only(schema, {"type", "enum", "const"}, where)
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        options = []
        for value in values:
            if isinstance(value, str):
                if "<" in value:
                    raise ValueError(f"{where}: the value {value!r} holds '<'")
                options.append(f'<|"|> {json.dumps(value)} <|"|>')
            elif value is None or isinstance(value, bool | int | float):
                options.append(json.dumps(json.dumps(value)))
            else:
                raise ValueError(f"{where}: only scalar enum values are decoded")
        return self.rule(" | ".join(options))


def _only(schema: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(schema) - allowed - _DESCRIPTIVE)
    if extra:
        raise ValueError(f"{where}: {', '.join(extra)} not decoded in Gemma's call form")


def _seq(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)
