"""OpenAI endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Body -> `Admission.admit` (settings, choices, one submission) -> `OpenAIResponse` (chunks or
one JSON body). A client that disconnects, streaming or not, aborts its request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from marble.model.tokenizer import ChatTemplateError, ReservedTemplateVariable
from marble.scheduler.sampling_params import InvalidParam
from marble.server.admission import Admission, invalid
from marble.server.async_engine import AsyncEngine
from marble.server.chat_prompt import chat_prompt
from marble.server.errors import APIError
from marble.server.json_body import json_body, request_body
from marble.server.lifecycle import Lifecycle
from marble.server.openai_format import Kind, OpenAIResponse
from marble.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingBody
from marble.server.request_record import RequestRecord
from marble.server.routes.deps import AdmissionDep, LifecycleDep, RequestIdDep, require_api_key
from marble.server.sse import sse_response
from marble.structured.tools import ToolPlan

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
T = TypeVar("T")
CompletionBody = Annotated[CompletionRequest, json_body(CompletionRequest)]
ChatBody = Annotated[ChatCompletionRequest, json_body(ChatCompletionRequest)]


def _model_card(lifecycle: Lifecycle, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "marble"}
    if lifecycle.engine is not None:
        served = lifecycle.engine.served(name)
        card["max_model_len"] = served.context
        # The serving defaults a request's fields are merged over (the dashboard's form), of
        # the fields this model reads.
        card["defaults"] = served.shown_params(served.defaults)
    return card


@router.get("/models")
async def models(lifecycle: LifecycleDep) -> dict[str, Any]:
    """Every served model, the default (what a request naming none gets) first."""
    return {"object": "list", "data": [_model_card(lifecycle, n) for n in lifecycle.model_names]}


@router.get("/models/{model:path}")
async def model(model: str, admission: AdmissionDep) -> dict[str, Any]:
    admission.check_model(model)
    return _model_card(admission.lifecycle, model)


@router.post("/completions", response_model=None, openapi_extra=request_body(CompletionRequest))
async def completions(
    body: CompletionBody, request: Request, admission: AdmissionDep, request_id: RequestIdDep
) -> Response:
    engine = admission.ready(body.model)
    prompts = body.prompts()
    record = await admission.admit(engine, request_id, body, prompts, body.suffix, lossless=True)
    echo = None
    if body.echo:  # after submitting: the prompts are known to fit the context by now
        tokenizer = engine.served(body.model).tokenizer
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    response = _openai("completion", admission, engine, record, body, body.logprobs, echo)
    return await _respond(admission, engine, request, record, response, body.stream)


@router.post(
    "/chat/completions", response_model=None, openapi_extra=request_body(ChatCompletionRequest)
)
async def chat_completions(
    body: ChatBody, request: Request, admission: AdmissionDep, request_id: RequestIdDep
) -> Response:
    engine = admission.ready(body.model)
    tokenizer = engine.served(body.model).tokenizer
    try:
        prompt = chat_prompt(body, tokenizer)
    except InvalidParam as exc:
        raise invalid(exc) from exc
    except ReservedTemplateVariable as exc:
        raise APIError(400, str(exc), param="chat_template_kwargs", reason="invalid") from exc
    except ChatTemplateError as exc:
        code = "chat_template_error" if tokenizer.chat_template else "no_chat_template"
        raise APIError(400, str(exc), param="messages", code=code, reason="invalid") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", reason="invalid") from exc
    record = await admission.admit(
        engine, request_id, body, [prompt.text], lossless=True, constraint=prompt.constraint
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    response = _openai("chat", admission, engine, record, body, logprobs, tools=prompt.tools)
    return await _respond(admission, engine, request, record, response, body.stream)


def _openai(
    kind: Kind,
    admission: Admission,
    engine: AsyncEngine,
    record: RequestRecord,
    body: SamplingBody,
    logprobs: int | None,
    echo: list[str] | None = None,
    tools: ToolPlan | None = None,
) -> OpenAIResponse:
    settings, draft = admission.settings, admission.lifecycle.drafts[record.model]
    return OpenAIResponse(
        kind,
        record,
        draft,
        n=body.n,
        retry_after_s=settings.retry_after_s,
        on_failure=lambda: engine.abort(record),
        echo=echo,
        logprobs=logprobs,
        diffusing=body.diffusing,
        include_usage=body.include_usage,
        tools=tools if tools is not None and tools.parses else None,
        skip_special_tokens=body.sampling_params(
            engine.served(body.model).defaults
        ).skip_special_tokens,
    )


async def _respond(
    admission: Admission,
    engine: AsyncEngine,
    request: Request,
    record: RequestRecord,
    response: OpenAIResponse,
    stream: bool,
) -> Response:
    if not stream:
        result = await _until_done_or_disconnect(engine, request, response.collect(), record)
        return result if isinstance(result, Response) else JSONResponse(result)

    async def chunks() -> AsyncGenerator[str, None]:
        try:
            async for payload in response.stream():
                yield payload
        finally:
            engine.client_gone(record)  # no-op once finished; aborts when the client left

    kind = "chat" if response.kind == "chat" else "completions"
    return sse_response(
        admission.settings,
        chunks(),
        ping=False,
        open_streams=engine.metrics.open_streams.labels(kind),
    )


async def _until_done_or_disconnect(
    engine: AsyncEngine, request: Request, work: Awaitable[T], record: RequestRecord
) -> T | Response:
    """Await a non-streaming result; if the client leaves first, abort its request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    engine.client_gone(record)
    return Response(status_code=499)  # nobody is listening


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
