"""A request's JSON body, from bytes to its model at a cost bounded by the body's size alone.

Bodies past a few kilobytes are parsed and validated in a process of their own, never in the
server's: parsing holds an interpreter's lock for tens of milliseconds per megabyte, which in a
thread of the server is time its event loop waits. A body with more arrays and objects than any
valid one holds is refused from a count over its bytes, before it is parsed. Refusals are
`APIError` 400s that never quote the body. Knows nothing of the engine or of the routes' work.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from marble.server.errors import (
    EMPTY_BODY,
    NOT_JSON,
    NOT_JSON_TYPE,
    APIError,
    invalid_body,
    not_an_object,
)

M = TypeVar("M", bound=BaseModel)

# Arrays and objects in one body. A valid body holds a few thousand at most (1024 token-id
# prompts, 4096 chat messages with their content parts); parsing a million of them took the
# GIL for a second, which no worker thread hides.
MAX_CONTAINERS = 1 << 14
# Levels of nesting in one body. The deepest of JSONSchemaBench's 160 real-world schemas nests
# 13; a body nested some 400 deep parsed, then broke the parser process's pickling (a 500).
MAX_DEPTH = 100
INLINE_BYTES = 16 * 1024  # smaller bodies cost microseconds: parsed where they arrive
# Measured with benchmarks/hostile_bodies.py (four 3-4 MB invalid bodies at once): parsed in
# one worker thread, /health's p99 was 40-70 ms (a million numbers hold the lock for 50 ms at
# a time) and RSS stayed 16-42 MB higher; in the parser process it is a few ms, and the
# parse's memory is that process's.
_STRUCTURE = b'"[{'
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)


def containers(raw: bytes) -> int:
    """The arrays and objects in a JSON text (brackets inside strings are not counted), in a
    few passes over its bytes, each in C. Exact for valid JSON."""
    # Escaped backslashes go first (pairs, left to right, as JSON reads them), then escaped
    # quotes: every quote left opens or closes a string. Dropping all but quotes and
    # brackets, then any two adjacent quotes, changes no bracket's side of a string boundary.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    outside = text.replace(b'""', b"").split(b'"')[::2]
    return sum(map(len, outside))


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides: no type, or application/json or application/*+json."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse_body(model: type[M], raw: bytes, is_json: bool = True) -> M:
    """`raw` as `model`, or the `APIError` that says why not."""

    def refuse(message: str) -> APIError:
        return APIError(400, message, code="invalid_value", reason="invalid")

    if not raw:
        raise refuse(EMPTY_BODY)
    if not is_json:
        raise refuse(NOT_JSON_TYPE)
    brackets = raw.count(b"[") + raw.count(b"{")  # at least `containers`, and cheaper
    if brackets > MAX_CONTAINERS and containers(raw) > MAX_CONTAINERS:
        raise refuse(f"the request body holds more than {MAX_CONTAINERS} arrays and objects")
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise refuse("the request body nests arrays or objects too deeply") from exc
    except ValueError as exc:  # not JSON, or not UTF-8/16/32
        raise refuse(NOT_JSON) from exc
    if not isinstance(value, dict):
        raise refuse(not_an_object(value))
    if nesting(value) > MAX_DEPTH:
        raise refuse(f"the request body nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def nesting(value: object) -> int:
    """How deep arrays and objects nest in a parsed body (without recursing: it is bounded by
    the containers counted before parsing, not by the interpreter's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_apart(model: type[M], raw: bytes, is_json: bool) -> M | tuple[str, str | None]:
    """`parse_body` in the parser process: a refusal comes back as (message, param), which
    pickles where an exception with keyword arguments would not."""
    try:
        return parse_body(model, raw, is_json)
    except APIError as exc:
        return str(exc.detail), exc.param


class _Parser:
    """The one parser process, started on the first large body and again if it dies. Forked
    from a fresh server of its own (forkserver) that preloads only the body models: never
    from this multi-threaded process, never running the program's `__main__` again."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["marble.server.json_body"])
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
            return self._pool

    def start(self) -> None:
        """Have the process running: starting it forks and execs from this process, a pause
        of a few hundred milliseconds that belongs before serving, not in a request."""
        self.pool().submit(int).result()

    def reset(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False)

    async def parse(self, model: type[M], raw: bytes, is_json: bool) -> M:
        pool = self.pool()
        loop = asyncio.get_running_loop()
        try:
            parsed = await loop.run_in_executor(pool, _parse_apart, model, raw, is_json)
        except BrokenProcessPool as exc:  # killed (memory?): the next body gets a new one
            self.reset(pool)
            raise APIError(
                503, "the body parser restarted; retry", code="parser_restarted"
            ) from exc
        if isinstance(parsed, tuple):
            message, param = parsed
            raise APIError(400, message, param=param, code="invalid_value", reason="invalid")
        return parsed


_PARSER = _Parser()


async def start_parser() -> None:
    """Start the parser process (the app's start-up calls it, in a worker thread)."""
    await asyncio.to_thread(_PARSER.start)


def json_body(model: type[M]) -> Any:
    """A route's body as a dependency: `body: Annotated[Model, json_body(Model)]`, with
    `openapi_extra=request_body(Model)` on the route to document it."""

    async def read(request: Request) -> M:
        raw = await request.body()
        is_json = _is_json(request.headers.get("content-type"))
        if len(raw) <= INLINE_BYTES:
            return parse_body(model, raw, is_json)
        return await _PARSER.parse(model, raw, is_json)

    return Depends(read)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` FastAPI would write for `model` (`build_openapi` adds the
    model's schema to the components)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}
