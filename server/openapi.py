"""The OpenAPI document (`/openapi.json`): what the server really answers, in one place.

FastAPI generates the request side from the routes; this module rewrites the response side
of every operation from one table: the error statuses its path can raise, each with OpenAI's
error body (never FastAPI's 422: `marble.server.errors` sends invalid input as 400), the 200 bodies
as they are built, and the event streams as `text/event-stream`. Knows nothing of the engine.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.models import Schema
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from marble.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from marble.server.routes.deps import require_ops_key

# ------------------------------------------------------------------ response bodies (docs only)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # documented fields; a client ignores the rest


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """Every error, whatever its status: OpenAI's error object."""

    error: ErrorDetail


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None
    defaults: dict[str, Any] | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Open):
    status: str  # "ok", or the phase: "loading", "draining", "failed", "stopped"
    model: str
    active_requests: int | None = None
    error: str | None = None


class Live(_Open):
    status: Literal["alive"]


class ChunkEvent(_Open):
    """One event of an OpenAI stream (schema per event, as OpenAPI 3.1 reads event streams):
    `data:` holds a chunk's JSON, an error object if the request fails mid-stream, or the
    final `[DONE]`."""

    data: str


class StepEvent(_Open):
    """One event of a native stream: `event:` is its name (`request.*`, `step`, `choice.*`),
    `id:` its sequence number (resume with `Last-Event-ID`), `data:` its JSON. Ping comments
    come between events while idle; a request's stream ends with its final event."""

    event: str
    id: str
    data: str


_MODELS = (
    ErrorResponse,
    Completion,
    ChatCompletion,
    ModelList,
    ModelCard,
    Health,
    Live,
    ChunkEvent,
    StepEvent,
)
# The request bodies: their routes read them (`marble.server.json_body`), so FastAPI's
# document lacks them; they are written as FastAPI writes a body's schema.
_BODIES = (CompletionRequest, ChatCompletionRequest, GenerateRequest)

# ----------------------------------------------------------------------------- the table

_ERRORS = {
    400: "Invalid input: a body that is not a JSON object, a field of the wrong type or out "
    "of range, a prompt longer than the context, a field no body declares, or an OpenAI field "
    "Marble does not implement (`x-marble-unsupported: refused`) set to other than its "
    "neutral value (`param` names the field). Fields marked `x-marble-unsupported: ignored` "
    "are accepted and have no effect.",
    401: "Missing or wrong API key (only when the server has one; on `/metrics`, "
    "`/openapi.json` and `/docs` only without `--public-ops`): `Authorization: Bearer <key>`, "
    "or `?api_key=` on GET routes.",
    404: "Unknown model (`model` names another than the one served) or unknown request id.",
    413: "The body is larger than the server's limit.",
    429: "The waiting queue is full; retry after `Retry-After` seconds.",
    500: "The engine failed this request (it alone fails; the server keeps serving).",
    503: "The model is loading or failed to load, or the server is draining (or aborted this "
    "request while shutting down); retry after `Retry-After` seconds.",
    504: "The request ran past the server's `request_timeout_s` (code `deadline_exceeded`).",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}
}

_GENERATE = (400, 401, 404, 413, 429, 500, 503, 504)
_SSE = "text/event-stream"

# (method, path) -> (200 content: media type -> component schema, None for plain text;
#                    error statuses)
_ROUTES: dict[tuple[str, str], tuple[dict[str, str | None], tuple[int, ...]]] = {
    ("get", "/health"): ({"application/json": "Health"}, ()),
    ("get", "/live"): ({"application/json": "Live"}, ()),
    # Prometheus text exposition format; behind the API key unless the server has public_ops.
    ("get", "/metrics"): ({"text/plain": None}, (401,)),
    ("get", "/v1/models"): ({"application/json": "ModelList"}, (401,)),
    ("get", "/v1/models/{model}"): ({"application/json": "ModelCard"}, (401, 404)),
    ("post", "/v1/completions"): (
        {"application/json": "Completion", _SSE: "ChunkEvent"},
        _GENERATE,
    ),
    ("post", "/v1/chat/completions"): (
        {"application/json": "ChatCompletion", _SSE: "ChunkEvent"},
        _GENERATE,
    ),
    ("post", "/v1/diffusion/generate"): ({_SSE: "StepEvent"}, _GENERATE),
    ("get", "/v1/diffusion/requests/{request_id}/events"): (
        {_SSE: "StepEvent"},
        (400, 401, 404, 503),
    ),
    ("get", "/v1/diffusion/events"): ({_SSE: "StepEvent"}, (400, 401, 503)),
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(content: dict[str, str | None]) -> dict[str, Any]:
    media = {
        media_type: {"schema": _ref(name) if name else {"type": "string"}}
        for media_type, name in content.items()
    }
    description = "OK"
    if _SSE in content:
        description += ": an event stream" + (" with `stream: true`" if len(content) > 1 else "")
    return {"description": description, "content": media}


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": _ref("ErrorResponse")}},
    }
    if status in (429, 503):
        response["headers"] = {k: {**v, "required": True} for k, v in _RETRY_AFTER.items()}
    return response


def _responses(method: str, path: str, operation: dict[str, Any]) -> dict[str, Any]:
    if (method, path) in _ROUTES:
        content, errors = _ROUTES[method, path]
        responses = {"200": _ok(content)}
    else:  # a route this table does not know yet: keep its 200, derive its errors
        responses = {"200": operation["responses"].get("200", {"description": "OK"})}
        errors = tuple(
            s
            for s, applies in (
                (400, "requestBody" in operation or operation.get("parameters")),
                (401, path.startswith("/v1/")),
                (413, "requestBody" in operation),
            )
            if applies
        )
    if path == "/health":
        responses["503"] = {
            "description": "Not ready: loading, draining, stopped, or the model failed to load.",
            "content": {"application/json": {"schema": _ref("Health")}},
            "headers": {k: {**v, "required": True} for k, v in _RETRY_AFTER.items()},
        }
    for status in errors:
        responses[str(status)] = _error(status)
    return responses


def _pin_model(schema: dict[str, Any], body: dict[str, Any], model_names: list[str]) -> None:
    """A body's `model` may only name a served model (another name is a 404)."""
    ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    target = schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    field = target.get("properties", {}).get("model")
    if field is None:
        return
    for branch in [field, *field.get("anyOf", ())]:
        if branch.get("type") == "string":
            branch["enum"] = list(model_names)
    field["description"] = (
        "a served model (optional: the first listed by default); another name is a 404"
    )


def build_openapi(app: FastAPI, model_names: list[str]) -> dict[str, Any]:
    """FastAPI's document with each operation's responses replaced from the table above."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in _MODELS:
        spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(spec.pop("$defs", {}))
        components[model.__name__] = spec
    for model in _BODIES:
        spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, part in [*spec.pop("$defs", {}).items(), (model.__name__, spec)]:
            components[name] = jsonable_encoder(Schema(**part), by_alias=True, exclude_none=True)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            operation["responses"] = _responses(method, path, operation)
            if "requestBody" in operation:
                _pin_model(schema, operation["requestBody"], model_names)
    return schema


def install_openapi(app: FastAPI, model_names: list[str]) -> None:
    """Serve `build_openapi` at `/openapi.json` (built once, on first use) and its pages at
    `/docs` and `/redoc`, behind the API key like `/metrics` (`require_ops_key`): the app is
    created without FastAPI's own, which no dependency can guard."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, model_names)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    guarded = [Depends(require_ops_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    def spec_url(request: Request) -> str:
        """The page's browser fetches the document without headers: a key the page was
        opened with (`?api_key=`) goes along, URL-quoted so it cannot break out of the page."""
        key = request.query_params.get("api_key")
        return "/openapi.json" if key is None else f"/openapi.json?api_key={quote(key, safe='')}"

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=spec_url(request), title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=guarded)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=spec_url(request), title=f"{app.title} - ReDoc")
