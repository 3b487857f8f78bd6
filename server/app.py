"""`create_app(settings, engine=None)`: the FastAPI application and its lifespan.

The lifespan starts the engine thread (loading the checkpoint first, in a worker thread, when
no engine is injected; `/health` says 503 meanwhile) and drains it on shutdown. No import-time
side effects: tests build apps around tiny engines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from marble.scheduler.engine import Engine
from marble.server.admission import Admission
from marble.server.errors import install_error_handlers
from marble.server.json_body import start_parser
from marble.server.lifecycle import Lifecycle
from marble.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from marble.server.openapi import install_openapi
from marble.server.routes import diffusion, health, openai
from marble.server.settings import Settings


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    lifecycle = Lifecycle(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start_parser()
        await lifecycle.startup()
        try:
            yield
        finally:
            await lifecycle.shutdown()

    app = FastAPI(
        title="Marble",
        summary="OpenAI-compatible server for diffusion language models, with live step streams",
        lifespan=lifespan,
        # install_openapi serves these, behind the API key unless settings.public_ops.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.lifecycle = lifecycle
    app.state.admission = Admission(lifecycle)
    install_error_handlers(app, lifecycle.metrics.reject)
    install_openapi(app, lifecycle.model_names)  # built on first use, from every route
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(diffusion.router)
    # The dashboard's scripts and styles (`/` serves its page).
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_body_bytes, on_reject=lifecycle.metrics.reject
    )
    # Outermost: every response gets its id.
    app.add_middleware(RequestIdMiddleware, replica_id=settings.replica_id)
    return app
