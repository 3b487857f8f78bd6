"""Dependencies shared by the routes: the server state and the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from marble.server.errors import APIError
from marble.server.middleware import request_id_of
from marble.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.marble


def get_request_id(request: Request) -> str:
    return request_id_of(request.scope)


StateDep = Annotated[ServerState, Depends(get_state)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


def require_api_key(request: Request, state: StateDep) -> None:
    """`Authorization: Bearer <key>` when the server has a key. GET streams may pass
    `?api_key=` instead, since browsers' EventSource cannot set headers."""
    key = state.settings.api_key
    if not key:
        return
    given = ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif request.method == "GET":
        given = request.query_params.get("api_key", "")
    if not secrets.compare_digest(given.encode(), key.encode()):
        state.metrics.reject("unauthorized")
        raise APIError(
            401,
            "invalid or missing API key (send Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
