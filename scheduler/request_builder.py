"""A request from a prompt and its settings: `build_request` validates, tokenizes and sizes it
for the model it names, without queueing anything.

Sizes are checked in O(1) before anything proportional to them is built: max_tokens and top_k
against the model first, text against the longest text the context could hold before it is
tokenized; the denoising work asked for against its family's bound (at most
MAX_FORWARDS_PER_POSITION forwards per decoded position), whose worst case the request keeps as
`max_forwards`. Every refusal is an `InvalidParam` naming its field. Touches no engine state,
so the server runs it off the event loop.
"""

from __future__ import annotations

import uuid

from marble.scheduler.healing import heal
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import (
    InvalidParam,
    SamplingParams,
)
from marble.scheduler.served_model import ServedModel
from marble.structured.compiler import ConstraintError
from marble.structured.constraint import Constraint
from marble.structured.row import RowConstraint

_MARBLE_DEFAULTS = SamplingParams()


def build_request(
    m: ServedModel,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    suffix: str | list[int] | None = None,
    constraint: Constraint | None = None,
) -> Request:
    """A validated, tokenized request for model `m` (its defaults when `params` is None),
    its output held to `constraint` when given (compiled here: its errors name its field)."""
    params = params or m.defaults
    context = m.context
    if suffix and not m.family.infills:
        raise InvalidParam("suffix", "suffix (infilling) is not supported by this model")
    if constraint is not None:
        params = _beside_a_constraint(m, params, constraint, suffix)
    for name, why in m.family.required.items():
        if getattr(params, name) is None:
            raise InvalidParam(name, why)
    m.family.check(m, params, suffix)  # first: its messages say what to give instead
    _refuse_unread(m, params)
    if params.max_tokens > context:
        raise InvalidParam(
            "max_tokens",
            f"max_tokens ({params.max_tokens}) exceeds the model's context of {context}",
        )
    vocab = m.vocab_size
    if params.top_k > vocab:
        raise InvalidParam(
            "top_k", f"top_k ({params.top_k}) exceeds the vocabulary of {vocab} tokens"
        )
    prompt_ids = _ids(m, "prompt", prompt)
    suffix_ids = _ids(m, "suffix", suffix or [])
    if not prompt_ids:
        raise InvalidParam("prompt", "prompt is empty")
    for name, ids in (("prompt", prompt_ids), ("suffix", suffix_ids)):
        if any(not 0 <= i < vocab for i in ids):
            raise InvalidParam(name, f"{name} token ids must be in [0, {vocab})")
        if m.family.masked and m.special.mask in ids:
            raise InvalidParam(name, f"{name} must not contain the mask token id {m.special.mask}")
    heal_text, heal_ids = "", None
    # Healing would start the output with the prompt's last text, outside the grammar.
    if params.token_healing and isinstance(prompt, str) and constraint is None:
        banned = m.special.stop_ids | {m.special.mask}
        prompt_ids, heal_text, heal_ids = heal(m.tokenizer, prompt_ids, vocab, banned)
    generated = m.family.decoded_tokens(m, len(prompt_ids), params)
    if len(prompt_ids) + generated + len(suffix_ids) > context:
        raise InvalidParam(
            "prompt",
            f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}"
            + (
                f", decoded as {generated} in whole canvases"
                if generated > params.max_tokens
                else ""
            )
            + f") + suffix ({len(suffix_ids)}) exceeds the model's context of {context}",
        )
    request = Request(
        request_id or uuid.uuid4().hex,
        prompt_ids,
        params,
        m.special.mask,
        suffix_ids,
        heal_text=heal_text,
        heal_ids=heal_ids,
        model=m.name,
        block_offset=m.family.block_offset(len(prompt_ids), params),
    )
    request.kv_bytes = m.family.kv_bytes(m, request, generated)
    request.max_forwards = m.family.max_forwards(request, generated)
    if constraint is not None:
        try:
            request.constraint = RowConstraint(m.grammars.compile(constraint))
        except ConstraintError as exc:
            raise InvalidParam(exc.param, str(exc)) from exc
        # Worst case, a constrained row commits one token a step.
        request.max_forwards = max(request.max_forwards, generated)
    return request


def _beside_a_constraint(
    m: ServedModel, params: SamplingParams, constraint: Constraint, suffix: object
) -> SamplingParams:
    """The settings a constrained request runs with: the model's default editing off (edits
    would rewrite committed text), and what structured output cannot honour refused by name:
    a family whose runner has no constrained rule, and settings that would change committed
    text behind the grammar's back (remasks, edits asked for, a suffix the output must run
    into, stop strings that cut it, decoding past the end of the match)."""
    if params.editing_threshold == m.defaults.editing_threshold:
        params = params.replace(editing_threshold=None)
    if not m.family.constrains:
        raise InvalidParam(
            constraint.param,
            f"structured output is not supported by this model (the {m.family.name} family)",
        )
    refusals = {
        "suffix": (suffix, "a suffix cannot be combined with structured output"),
        "stop": (params.stop, "stop strings would cut structured output: the grammar ends it"),
        "verify_threshold": (
            params.verify_threshold is not None,
            "verify_threshold remasks committed tokens, which structured output keeps",
        ),
        "ignore_eos": (params.ignore_eos, "structured output ends where its match ends"),
        "editing_threshold": (
            params.editing_threshold is not None,
            "editing rewrites committed tokens, which structured output keeps",
        ),
    }
    for name, (given, why) in refusals.items():
        if given:
            raise InvalidParam(name, why)
    return params


def _refuse_unread(m: ServedModel, params: SamplingParams) -> None:
    """A field the model's family does not read may only hold Marble's default or the model's
    serving default: any other value asks for something it would silently not do."""
    for name in SamplingParams.field_names():
        if name in m.family.fields:
            continue
        value = getattr(params, name)
        if value != getattr(_MARBLE_DEFAULTS, name) and value != getattr(m.defaults, name):
            raise InvalidParam(
                name, f"{name} is not supported by this model (the {m.family.name} family)"
            )


def _ids(m: ServedModel, name: str, value: str | list[int]) -> list[int]:
    """Token ids of a prompt or suffix, refusing at once what cannot fit the context: a
    text longer than `context` tokens of the vocabulary's longest text (with room for
    normalisation) is never tokenized."""
    context = m.context
    if not isinstance(value, str):
        if len(value) > context:
            raise InvalidParam(
                name, f"{name} ({len(value)} tokens) exceeds the context of {context}"
            )
        return list(value)
    if len(value) > 2 * context * m.tokenizer.max_token_chars:
        raise InvalidParam(
            name,
            f"{name} ({len(value)} characters) cannot fit the model's context of {context} tokens",
        )
    return m.tokenizer.encode(value)
