"""OpenAI endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Body -> `SamplingParams` per choice -> `ServerState.submit` -> `Translator` (chunks or one
JSON body). A client that disconnects, streaming or not, aborts its request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from marble.model.tokenizer import ChatTemplateError
from marble.server.completions import Translator
from marble.server.group import RequestGroup
from marble.server.protocol import ChatCompletionRequest, CompletionRequest
from marble.server.routes.deps import RequestIdDep, StateDep, require_api_key
from marble.server.sse import sse_response
from marble.server.state import ServerState

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "marble",
    }
    if state.engine is not None:
        card["max_model_len"] = state.engine.model.cfg.max_seq_len
        # The serving defaults a request's fields are merged over (the dashboard's form).
        card["defaults"] = state.engine.defaults.to_dict()
    return card


@router.get("/models")
async def models(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/models/{model:path}")
async def model(model: str, state: StateDep) -> dict[str, Any]:
    state.check_model(model)
    return _model_card(state)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, state: StateDep, request_id: RequestIdDep
) -> Response | dict[str, Any]:
    state.check_model(body.model)
    hub = state.ready_hub()
    prompts = state.params(body.prompts)
    jobs = state.jobs(body, prompts, body.suffix)
    group = hub.create(request_id, state.model_name, len(jobs), draft_every=None, lossless=True)
    await state.submit(group, jobs)
    echo = None
    if body.echo:  # after submitting: the prompts are known to fit the context by now
        echo = [p if isinstance(p, str) else hub.tokenizer.decode(p) for p in prompts]
    translator = Translator(
        "completion",
        hub,
        group,
        n=body.n,
        echo=echo,
        logprobs=body.logprobs,
        diffusing=body.diffusing,
        include_usage=body.include_usage,
    )
    return await _respond(state, request, group, translator, body.stream)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep, request_id: RequestIdDep
) -> Response | dict[str, Any]:
    state.check_model(body.model)
    hub = state.ready_hub()
    try:
        messages = [m.to_template() for m in body.messages]
        prompt = hub.tokenizer.render_chat(messages)
    except ChatTemplateError as exc:
        raise state.reject(
            400, "invalid", str(exc), param="messages", code="no_chat_template"
        ) from exc
    except ValueError as exc:
        raise state.reject(400, "invalid", str(exc), param="messages") from exc
    jobs = state.jobs(body, [prompt])
    group = hub.create(request_id, state.model_name, len(jobs), draft_every=None, lossless=True)
    await state.submit(group, jobs)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    translator = Translator(
        "chat",
        hub,
        group,
        n=body.n,
        logprobs=logprobs,
        diffusing=body.diffusing,
        include_usage=body.include_usage,
    )
    return await _respond(state, request, group, translator, body.stream)


async def _respond(
    state: ServerState, request: Request, group: RequestGroup, translator: Translator, stream: bool
) -> Response:
    if not stream:
        result = await state.until_done_or_disconnect(request, translator.collect(), group)
        return result if isinstance(result, Response) else JSONResponse(result)

    async def chunks() -> AsyncGenerator[str, None]:
        try:
            async for payload in translator.stream():
                yield payload
        finally:
            state.client_gone(group)  # no-op once finished; aborts when the client left

    kind = "chat" if translator.kind == "chat" else "completions"
    return sse_response(
        state.settings,
        chunks(),
        ping=False,
        open_streams=state.metrics.open_streams.labels(kind),
    )
