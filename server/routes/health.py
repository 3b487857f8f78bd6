"""Operations: readiness (`/health`), liveness (`/live`), Prometheus (`/metrics`) and the
dashboard page (`/`). These never wait on the engine. With an API key, `/metrics` needs it
(unless `public_ops`); the others stay public: probes and browsers send no key."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

from marble.server.routes.deps import LifecycleDep, require_ops_key

router = APIRouter()


@router.get("/health")
async def health(lifecycle: LifecycleDep) -> JSONResponse:
    """200 when ready to serve; 503 while loading, draining, or after a failed load."""
    body: dict = {
        "status": "ok" if lifecycle.phase == "ready" else lifecycle.phase,
        "model": lifecycle.model_name,
        "replica_id": lifecycle.settings.replica_id,  # whose request ids start with it
    }
    if lifecycle.phase == "ready" and lifecycle.engine is not None:
        body["active_requests"] = lifecycle.engine.registry.num_running
        return JSONResponse(body)
    if lifecycle.load_error:
        body["error"] = lifecycle.load_error
    headers = {"Retry-After": str(lifecycle.settings.retry_after_s)}
    return JSONResponse(body, status_code=503, headers=headers)


@router.get("/live")
async def live() -> dict:
    return {"status": "alive"}


@router.get("/metrics", dependencies=[Depends(require_ops_key)])
async def metrics(lifecycle: LifecycleDep) -> Response:
    payload, content_type = lifecycle.metrics.render()
    return Response(payload, media_type=content_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    page = (
        resources.files("marble.server").joinpath("static/index.html").read_text(encoding="utf-8")
    )
    return HTMLResponse(page)
