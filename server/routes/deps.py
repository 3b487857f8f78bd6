"""Dependencies shared by the routes: the lifecycle, admission, request id and API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from marble.server.admission import Admission
from marble.server.errors import APIError
from marble.server.lifecycle import Lifecycle
from marble.server.middleware import request_id_of


async def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


async def get_admission(request: Request) -> Admission:
    return request.app.state.admission


async def get_request_id(request: Request) -> str:
    return request_id_of(request.scope)


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


async def require_api_key(request: Request, lifecycle: LifecycleDep) -> None:
    """`Authorization: Bearer <key>` when the server has a key. GET streams may pass
    `?api_key=` instead, since browsers' EventSource cannot set headers."""
    key = lifecycle.settings.api_key
    if not key:
        return
    given = ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif request.method == "GET":
        given = request.query_params.get("api_key", "")
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(
            401,
            "invalid or missing API key (send Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
            reason="unauthorized",
        )


async def require_ops_key(request: Request, lifecycle: LifecycleDep) -> None:
    """The operations pages (`/metrics`, `/openapi.json`, `/docs`) show model names and load:
    behind the API key too, unless the server makes them public (`public_ops`)."""
    if not lifecycle.settings.public_ops:
        await require_api_key(request, lifecycle)
