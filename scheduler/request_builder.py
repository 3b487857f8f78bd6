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
    MAX_FORWARDS_PER_POSITION,
    InvalidParam,
    SamplingParams,
)
from marble.scheduler.served_model import ServedModel


def build_request(
    m: ServedModel,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    suffix: str | list[int] | None = None,
) -> Request:
    """A validated, tokenized request for model `m` (its defaults when `params` is None)."""
    params = params or m.defaults
    context = m.context
    if m.uniform:
        _check_uniform(m, params, suffix)
    elif m.block_causal:
        _check_block_causal(params, suffix)
    elif params.editing_threshold is not None:
        raise InvalidParam(
            "editing_threshold",
            "editing_threshold needs a model trained to edit (LLaDA2.1); this one may "
            "verify instead (verify_threshold)",
        )
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
        if not m.uniform and m.special.mask in ids:
            raise InvalidParam(name, f"{name} must not contain the mask token id {m.special.mask}")
    heal_text, heal_ids = "", None
    if params.token_healing and isinstance(prompt, str):  # ids are taken as given
        banned = m.special.stop_ids | {m.special.mask}
        prompt_ids, heal_text, heal_ids = heal(m.tokenizer, prompt_ids, vocab, banned)
    generated = _canvas_tokens(m, len(prompt_ids), params)
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
        block_offset=len(prompt_ids) % params.block_length if m.block_causal else 0,
    )
    if m.uniform:
        # The cache holds the prompt and every canvas but the last, which is never encoded.
        tokens = len(prompt_ids) + generated - m.model.cfg.canvas_length
        request.kv_bytes = m.model.cache_bytes(tokens)
        request.max_forwards = _uniform_forwards(request)
    elif m.block_causal:
        # The cache holds the prompt and every block but the last.
        cached = len(prompt_ids) + generated - params.block_length
        request.kv_bytes = m.model.cache_bytes(cached)
        request.max_forwards = _block_causal_forwards(request, generated)
    else:
        if params.cache != "none":
            copies = 2 if params.cfg_scale > 0 else 1  # CFG's unconditional copy has its own
            request.kv_bytes = copies * request.canvas_len * m.kv_bytes_per_token
        request.max_forwards = _masked_forwards(request)
    return request


def _canvas_tokens(m: ServedModel, prompt_len: int, params: SamplingParams) -> int:
    """Tokens the model decodes for `max_tokens`: a uniform-state model decodes whole
    canvases, a block-causal one through the end of the last block it reaches (the
    completion is then cut to max_tokens)."""
    if m.uniform:
        length = m.model.cfg.canvas_length
        return -(-params.max_tokens // length) * length
    if m.block_causal:
        size = params.block_length
        return -(-(prompt_len + params.max_tokens) // size) * size - prompt_len
    return params.max_tokens


def _check_uniform(m: ServedModel, params: SamplingParams, suffix: str | list[int] | None) -> None:
    """What a uniform-state model cannot do, refused by name."""
    length = m.model.cfg.canvas_length
    if params.block_length != length:
        raise InvalidParam(
            "block_length",
            f"this model denoises canvases of {length} tokens: block_length must be "
            f"{length} (or left out)",
        )
    if params.steps is None:
        raise InvalidParam("steps", "this model needs steps (denoising steps per canvas)")
    limit = MAX_FORWARDS_PER_POSITION * length
    if params.steps > limit:
        raise InvalidParam(
            "steps",
            f"steps ({params.steps}) exceeds {limit}: a canvas of {length} tokens takes at "
            f"most {MAX_FORWARDS_PER_POSITION} denoising steps per position",
        )
    # Self-correction is built into this model's renoising: neither masked-model kind.
    refused = (
        ("cfg_scale", 0.0),
        ("token_healing", False),
        ("verify_threshold", None),
        ("editing_threshold", None),
    )
    for name, off in refused:
        if getattr(params, name) != off:
            raise InvalidParam(name, f"{name} is not supported by this model")
    if suffix:
        raise InvalidParam("suffix", "suffix (infilling) is not supported by this model")


def _uniform_forwards(request: Request) -> int:
    """Worst case: every canvas runs all its steps (its stop rule never fires)."""
    return len(request.blocks) * (request.params.steps or 1)


def _check_block_causal(params: SamplingParams, suffix: str | list[int] | None) -> None:
    """What a block-causal model cannot do, refused by name."""
    if params.block_length is None:
        raise InvalidParam("block_length", "this model denoises in blocks: give block_length")
    if params.threshold is None:
        raise InvalidParam(
            "threshold", "this model unmasks by threshold: give threshold (not steps alone)"
        )
    for name, off in (("cfg_scale", 0.0), ("token_healing", False), ("verify_threshold", None)):
        if getattr(params, name) != off:
            raise InvalidParam(name, f"{name} is not supported by this model")
    if suffix:
        raise InvalidParam("suffix", "suffix (infilling) is not supported by this model")
    # A block takes up to one forward per position to fill, then its edit rounds.
    size = params.block_length
    limit = (MAX_FORWARDS_PER_POSITION - 1) * size
    if _edit_rounds(params) > limit:
        raise InvalidParam(
            "max_post_steps",
            f"max_post_steps ({params.max_post_steps}) exceeds {limit}: a block of {size} "
            f"tokens takes at most {MAX_FORWARDS_PER_POSITION} forwards per position, up "
            f"to {size} to fill it and {limit} edit rounds",
        )


def _edit_rounds(params: SamplingParams) -> int:
    """Mask-free forwards a block-causal block may take once filled (block_runner.py)."""
    return params.max_post_steps if params.editing_threshold is not None else 0


def _block_causal_forwards(request: Request, decoded: int) -> int:
    """Worst case: every decoded position filled by a forward of its own (at least one
    commits per forward while masks remain), then every block's edit rounds."""
    return decoded + len(request.blocks) * _edit_rounds(request.params)


def _masked_forwards(request: Request) -> int:
    """Worst case of a full-attention masked request: its planned steps (at most one per
    token), or under the threshold rule one per token (each forward commits at least one
    more than verify masks again). Never more than max_tokens: nothing to refuse."""
    planned = request.total_steps
    return request.params.max_tokens if planned is None else planned


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
