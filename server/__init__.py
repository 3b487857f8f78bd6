"""Marble's HTTP layer: the FastAPI app and one file per leg of a request's round trip
(docs/architecture.md)."""
