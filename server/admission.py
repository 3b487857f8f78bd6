"""Admission: the opening every generation route shares, and the only place a request is let
in or refused.

Served model? Ready? How many choices? Then the body's settings become `SamplingParams`
(once: `SamplingBody.sampling_params`), one `Job` per prompt and choice, a `RequestRecord`,
and one submission to the engine. Each refusal leaves as an `APIError` carrying the field the
validation named and the reason it counts under. Knows nothing of response shapes.
"""

from __future__ import annotations

from marble.scheduler.sampling_params import SEED_LIMIT, InvalidParam, SamplingParams
from marble.scheduler.scheduler import QueueFullError
from marble.server.async_engine import AsyncEngine, EngineClosed, Job
from marble.server.errors import APIError
from marble.server.lifecycle import Lifecycle
from marble.server.protocol import SamplingBody
from marble.server.request_record import RequestRecord
from marble.structured.constraint import Constraint


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice k of a seeded request uses seed + k, so choices differ yet reproduce."""
    if index == 0 or params.seed is None:
        return params
    return params.replace(seed=(params.seed + index) % SEED_LIMIT)


def invalid(exc: ValueError) -> APIError:
    """400 for a refused value; `InvalidParam` names its field."""
    param = exc.param if isinstance(exc, InvalidParam) else None
    return APIError(400, str(exc), param=param, code="invalid_value", reason="invalid")


class Admission:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.settings = lifecycle.settings

    def ready(self, model: str | None) -> AsyncEngine:
        """The engine for a request naming `model` (None: whatever is served), or a 404/503."""
        self.check_model(model)
        return self.lifecycle.ready()

    def check_model(self, model: str | None) -> None:
        served = self.lifecycle.model_names
        if model is not None and model not in served:
            names = ", ".join(repr(n) for n in served)
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {names}",
                param="model",
                code="model_not_found",
                reason="unknown_model",
            )

    async def admit(
        self,
        engine: AsyncEngine,
        request_id: str,
        body: SamplingBody,
        prompts: list[str | list[int]],
        suffix: str | None = None,
        *,
        lossless: bool,
        draft_every: int | None = None,
        constraint: Constraint | None = None,
    ) -> RequestRecord:
        """Queue one engine request per prompt and choice (`body.n`), all or none.
        `lossless`: an OpenAI route, which reads every raw output (`record.outputs`).
        `constraint`: what the route requires of the output (a tool call), where the body's
        own structured-output fields ask for nothing."""
        total = len(prompts) * body.n
        if total > self.settings.max_n:
            raise APIError(
                400,
                f"at most {self.settings.max_n} choices per request",
                param="n",
                reason="invalid",
            )
        try:
            params = body.sampling_params(engine.served(body.model).defaults)
            constraint = constraint or body.constraint()
        except InvalidParam as exc:
            raise invalid(exc) from exc
        model = body.model or self.lifecycle.model_name
        jobs = [
            Job(p, choice_params(params, j), suffix, model, constraint)
            for p in prompts
            for j in range(body.n)
        ]
        record = engine.registry.create(request_id, model, total, draft_every, lossless)
        try:
            await engine.submit(record, jobs)
        except EngineClosed as exc:
            raise self.lifecycle.not_ready() from exc
        except QueueFullError as exc:
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            raise APIError(
                429, f"server busy: {exc}", code="queue_full", headers=retry, reason="queue_full"
            ) from exc
        except ValueError as exc:
            raise invalid(exc) from exc
        return record
