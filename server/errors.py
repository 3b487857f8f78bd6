"""The HTTP error boundary: every failure leaves as OpenAI's error object.

`APIError` carries status, type, param, code and headers; the handlers registered by
`install_error_handlers` also reshape FastAPI's 422 validation errors (as 400) and Starlette's
404/405. Knows nothing of the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from marble.server.protocol import error_body

log = logging.getLogger(__name__)
MAX_ERRORS = 64  # more than a body's schema makes (its lists stop at their first bad item)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(HTTPException):
    """An error response in OpenAI's shape; subclassing HTTPException lets it cross
    FastAPI's body parsing unchanged. A refusal names its `reason`, the label it counts under
    in `marble_requests_rejected_total` when it reaches the handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return error_body(str(self.detail), self.type, self.param, self.code)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _field_path(loc: tuple[Any, ...]) -> list[str]:
    """A validation error's location as the client wrote it: field names and list indices,
    without "body" or the names pydantic gives the members of a union
    (`list[constrained-int]`)."""
    return [str(x) for x in loc if isinstance(x, int) or (x != "body" and x.isidentifier())]


MAX_NAME = 64  # characters of an unknown field's name quoted back: a name can be a megabyte


def _error_path(error: dict[str, Any]) -> list[str]:
    """`_field_path` of an error; an unknown field keeps its name, whatever its characters."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and loc:
        return [*_field_path(loc[:-1]), str(loc[-1])[:MAX_NAME]]
    return _field_path(loc)


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the errors of one bad value, the one that says most: a failed check of ours
    (value_error), else the deepest (for a union, the member that matched furthest)."""
    checks = [e for e in errors if e.get("type") == "value_error"]
    if checks:
        return checks[0]
    return max(errors, key=lambda e: len(_error_path(e)))


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The message and `param` of a refused body or parameter, from pydantic's errors (a
    bounded few: the cost of a refusal must not grow with the number of bad values)."""
    if not errors:
        return "invalid request body", None
    field = _error_path(errors[0])[:1]
    first = _most_telling([e for e in errors if _error_path(e)[:1] == field])
    loc = _error_path(first)
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return NOT_JSON, None
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole, not one field
        return _body_message(first), None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    if first.get("type") == "extra_forbidden":
        return f"{param!r} is not a supported field of this request", param
    return (f"{param}: {message}" if param else message), param


def invalid_body(exc: ValidationError) -> APIError:
    """A body pydantic refused, as a 400 naming its field. Each error would copy its input
    (`include_input`), and a body can hold a million bad values: only a few are read."""
    if exc.error_count() > MAX_ERRORS:
        message, param = f"the request body has more than {MAX_ERRORS} invalid values", None
    else:
        message, param = validation_message(exc.errors(include_input=False, include_url=False))
    return APIError(400, message, param=param, code="invalid_value", reason="invalid")


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


NOT_JSON = "request body is not valid JSON"
EMPTY_BODY = "the request body is empty: send a JSON object (Content-Type: application/json)"
NOT_JSON_TYPE = "the request body must be a JSON object sent as Content-Type: application/json"


def not_an_object(given: Any) -> str:
    """Why a JSON body that is not an object was refused: its kind, never its content."""
    return f"the request body must be a JSON object, not {_JSON_TYPES.get(type(given), 'that')}"


def _body_message(error: dict[str, Any]) -> str:
    """Why a body that is missing, not JSON, or JSON but not an object was refused."""
    if error.get("type") == "missing":
        return EMPTY_BODY
    given = error.get("input")
    if isinstance(given, bytes | bytearray):  # FastAPI parses JSON only when the type says so
        return NOT_JSON_TYPE
    return not_an_object(given)


def install_error_handlers(app: FastAPI, on_reject: Any = None) -> None:
    """`on_reject(reason)` counts refused requests (metrics)."""

    def count(reason: str) -> None:
        if on_reject is not None:
            on_reject(reason)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        count("invalid")
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            if exc.reason is not None:
                count(exc.reason)
            return error_response(exc)
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        message = str(exc.detail)
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        return error_response(APIError(status, message, code=code, headers=exc.headers))
