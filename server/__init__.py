"""Marble's HTTP layer: FastAPI app, engine thread, SSE streams, metrics (see `server.app`)."""
