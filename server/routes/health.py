"""Operations: readiness (`/health`), liveness (`/live`), Prometheus (`/metrics`) and the
dashboard page (`/`). These never wait on the engine."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from marble.server.routes.deps import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    """200 when ready to serve; 503 while loading, draining, or after a failed load."""
    body: dict = {
        "status": "ok" if state.phase == "ready" else state.phase,
        "model": state.model_name,
    }
    if state.phase == "ready" and state.hub is not None:
        body["active_requests"] = len(state.hub.routes)
        return JSONResponse(body)
    if state.load_error:
        body["error"] = state.load_error
    headers = {"Retry-After": str(state.settings.retry_after_s)}
    return JSONResponse(body, status_code=503, headers=headers)


@router.get("/live")
async def live() -> dict:
    return {"status": "alive"}


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    payload, content_type = state.metrics.render()
    return Response(payload, media_type=content_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    page = (
        resources.files("marble.server").joinpath("static/index.html").read_text(encoding="utf-8")
    )
    return HTMLResponse(page)
