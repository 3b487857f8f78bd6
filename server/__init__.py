"""Marble's HTTP layer: the FastAPI app and the legs of a request's round trip (README)."""
