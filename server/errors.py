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
from starlette.exceptions import HTTPException

from server.protocol import error_body

log = logging.getLogger(__name__)

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
    FastAPI's body parsing unchanged."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(str(self.detail), self.type, self.param, self.code)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI, on_reject: Any = None) -> None:
    """`on_reject(reason)` counts refused requests (metrics)."""

    def count(reason: str) -> None:
        if on_reject is not None:
            on_reject(reason)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        count("invalid")
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            return error_response(exc)
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        message = str(exc.detail)
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        return error_response(APIError(status, message, code=code, headers=exc.headers))
