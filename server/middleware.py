"""Pure ASGI middleware: a request id on every response, the body-size limit, and the last
error boundary (an unexpected exception becomes a logged 500 in OpenAI's shape).

A request id is 32 hex digits, after `<replica_id>-` when the server has a replica id: a
balancer routes attach-by-id on that tag (deploy/nginx/).

Pure ASGI rather than BaseHTTPMiddleware so streaming responses and `http.disconnect`
pass through untouched. Knows nothing of the engine.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from marble.server.errors import APIError
from marble.server.protocol import error_body

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "marble.request_id"


def request_id_of(scope: Scope) -> str:
    return scope[REQUEST_ID_KEY]


def new_request_id(replica_id: str | None) -> str:
    """`r1-<32 hex>` for replica `r1`, `<32 hex>` without a replica id."""
    token = uuid.uuid4().hex
    return token if replica_id is None else f"{replica_id}-{token}"


async def _send_json(
    send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestIdMiddleware:
    """Gives each HTTP request a fresh id (`X-Request-Id` on the response, the request's
    id in the engine and in events) and turns escaped exceptions into a 500. Ids start with
    `replica_id` when one is given."""

    def __init__(self, app: ASGIApp, replica_id: str | None = None) -> None:
        self.app = app
        self.replica_id = replica_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id(self.replica_id)
        scope[REQUEST_ID_KEY] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                body = error_body("internal server error", "server_error", None, "internal_error")
                await _send_json(send, 500, body, [header])


class BodyLimitMiddleware:
    """413 for bodies over `limit` bytes: at once when Content-Length says so, otherwise as
    soon as the streamed body crosses the limit."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than {self.limit} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                self.on_reject("too_large")
                await _send_json(send, 413, error_body(message, code="body_too_large"), [])
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    self.on_reject("too_large")
                    raise APIError(413, message, code="body_too_large")
            return msg

        await self.app(scope, limited_receive, send)
