"""A chat request's prompt: its messages and tools through the model's own chat template, and
what the request asks of the tools (`ToolPlan`). A template that does not render `tools`
(it ignores the variable) gets them as instructions in the system message, in the Hermes
form the plan then parses. Knows nothing of the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from marble.model.tokenizer import ChatTemplateError, TextTokenizer
from marble.scheduler.sampling_params import InvalidParam
from marble.server.protocol import ChatCompletionRequest
from marble.structured.constraint import Constraint
from marble.structured.tool_formats import HermesFormat, format_for_template
from marble.structured.tools import ToolPlan


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    tools: ToolPlan | None  # None: the request offers no tools
    constraint: Constraint | None  # what the tool choice requires of the output, if anything


def chat_prompt(body: ChatCompletionRequest, tokenizer: TextTokenizer) -> ChatPrompt:
    """Raises ValueError for bad messages, InvalidParam for tools that cannot be served and
    the template's own errors as `render_chat` does."""
    messages = [m.to_template() for m in body.messages]
    kwargs = body.chat_template_kwargs
    plan = body.tool_plan(format_for_template(tokenizer.chat_template or ""))
    if plan is None:
        return ChatPrompt(tokenizer.render_chat(messages, template_kwargs=kwargs), None, None)
    listed = [_tool_json(t.name, t.description, t.parameters) for t in plan.tools]
    bare = tokenizer.render_chat(messages, template_kwargs=kwargs)
    try:
        text = tokenizer.render_chat(messages, template_kwargs=kwargs, tools=listed)
    except ChatTemplateError as exc:  # it renders the messages, so the tools broke it
        message = f"this model's chat template cannot render them: {exc}"
        raise InvalidParam("tools", message) from exc
    if text == bare:
        plan = dataclasses.replace(plan, format=HermesFormat())
        text = tokenizer.render_chat(
            _instructed(messages, plan.format.describe(list(plan.tools))), template_kwargs=kwargs
        )
    try:
        constraint = plan.constraint(lambda marker: marker in tokenizer.added_tokens)
    except ValueError as exc:
        raise InvalidParam("tools", f"a required call cannot be decoded: {exc}") from exc
    return ChatPrompt(text, plan, constraint)


def _tool_json(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    function = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


def _instructed(messages: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    """The messages with `instructions` ending the system message (one is added first if
    there is none)."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        joined = f"{first['content']}\n\n{instructions}" if first["content"] else instructions
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]
