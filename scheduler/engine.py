"""The engine: `step()` = schedule -> run -> postprocess, one denoising step for every running
request, and the offline `generate()` that drains it.

Emits one `StepOutput` per running request per step and an `EngineStats` record per step. Each
model's rows go to its family's runner in one call; every runner's `RowStep` is postprocessed
the same way. Validation lives in request_builder.py, text settlement (detokenising, stop
strings, hold-back) in settlement.py. Knows no family, nothing of HTTP or asyncio.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from marble.model.device import default_kv_budget, resolve_device
from marble.model.prefix_cache import PrefixCache, PrefixStats
from marble.model.tokenizer import SpecialIds, TextTokenizer
from marble.scheduler.request import Request, RequestStatus
from marble.scheduler.request_builder import build_request
from marble.scheduler.sampling_params import InvalidParam, SamplingParams
from marble.scheduler.scheduler import Scheduler, SchedulerConfig
from marble.scheduler.served_model import ServedModel, load_served
from marble.scheduler.settlement import completion_len, cut, held_text, settle
from marble.scheduler.step_result import (
    CONSTRAINT_INCOMPLETE,
    REMASK,
    Change,
    Commit,
    RowError,
    RowStep,
    Runner,
)
from marble.structured.constraint import Constraint

DEFAULT_NAME = "marble"  # the model name of an engine built without one

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step did to one request; the last one for a request has `finished=True`."""

    request_id: str
    step: int  # forwards this request has taken part in (1-based)
    total_steps: int | None  # planned forwards, None under the threshold rule
    block_index: int  # block denoised this step
    num_blocks: int
    committed: list[Commit]
    num_masked: int
    tokens: list[int]  # the generated region now, mask id where still masked
    text: str  # stable text: committed, cut at EOS and stop strings, safe to stream
    block_completed: int | None = None  # index of the block this step completed
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None
    # With finish_reason "error": e.g. "non_finite_logits"; with "length": "constraint_incomplete"
    # (a structured-output match the canvas ran out before).
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    heal_text: str = ""  # token healing: the first token's leading text, left out of `text`
    forward: str | None = None  # the kind of forward this step took (runner.FORWARD_KINDS)
    positions: int = 0  # canvas positions that forward computed for this request
    # Forwards of each kind this step took for the request (a uniform-state step may encode
    # a finished canvas before its decode), and every kind so far.
    forwards: dict[str, int] = field(default_factory=dict)
    forwards_total: dict[str, int] = field(default_factory=dict)
    # Shown tokens that changed other than by a commit: edits and remasks of a masked model,
    # a uniform-state canvas's accepted and re-noised positions.
    changes: list[Change] = field(default_factory=list)
    canvas_span: tuple[int, int] | None = None  # [start, end) of `tokens` a whole canvas shows
    extras: dict[str, Any] = field(default_factory=dict)  # the family's figures, by key


@dataclass
class EngineStats:
    """One record per step, for metrics."""

    batch_size: int
    num_running: int
    num_waiting: int
    step_seconds: float
    tokens_committed: int
    finished: dict[str, int] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)  # rows by kind of forward
    positions: int = 0  # canvas positions computed this step, over all rows
    cache_bytes: int = 0  # KV storage held after the step: running rows' slots, spare ones
    # The prefix caches: totals since they were made, and what they hold after the step.
    prefix: PrefixStats = field(default_factory=PrefixStats)
    prefix_blocks: int = 0
    prefix_bytes: int = 0
    canvases: list[int] = field(default_factory=list)  # canvases of each request finished now


class HeldKV:
    """KV bytes the served models hold for no running request, as the scheduler sees them:
    their slot stores' spare slots and their prefix caches' blocks, given up (spare slots
    first, then blocks least recently used first, model by model) when a request needs them."""

    def __init__(
        self,
        models: Callable[[], Iterable[ServedModel]],
        served: Callable[[str | None], ServedModel],
    ) -> None:
        self.models = models  # the engine's, as they are now
        self.served = served  # the one a request runs on

    def _caches(self) -> list[PrefixCache]:
        return [m.prefixes for m in self.models() if m.prefixes is not None]

    @property
    def prefix_bytes(self) -> int:
        return sum(c.nbytes for c in self._caches())

    @property
    def nbytes(self) -> int:
        return sum(m.runner.spare_kv_bytes for m in self.models()) + self.prefix_bytes

    def summary(self) -> dict[str, Any]:
        """`EngineStats`' prefix fields: every cache's totals summed, and what they hold."""
        caches = self._caches()
        totals = PrefixStats()
        for cache in caches:
            for name in PrefixStats.__dataclass_fields__:
                setattr(totals, name, getattr(totals, name) + getattr(cache.stats, name))
        blocks = sum(len(c.blocks) for c in caches)
        return {"prefix": totals, "prefix_blocks": blocks, "prefix_bytes": self.prefix_bytes}

    def claim(self, request: Request) -> int:
        return self.served(request.model).claim_kv(request)

    def unclaim(self, request: Request) -> None:
        self.served(request.model).unclaim(request)

    def evict(self, nbytes: float) -> int:
        freed = 0
        for model in self.models():
            if freed >= nbytes:
                break
            freed += model.runner.release_kv(nbytes - freed)
        for cache in self._caches():
            if freed >= nbytes:
                break
            freed += cache.evict(nbytes - freed)
        return freed


class Engine:
    """Steps the requests of every model it serves: the first model given, then any added
    with `add_model`. A request names its model (`make_request(model=...)`); without a name
    it goes to the first."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        config: SchedulerConfig | None = None,
        defaults: SamplingParams | None = None,
        name: str = DEFAULT_NAME,
        compile: bool | str = False,
    ) -> None:
        served = ServedModel(name, model, tokenizer, defaults or SamplingParams(), compile=compile)
        self._serve(served, config)

    def _serve(self, first: ServedModel, config: SchedulerConfig | None) -> None:
        config = config or SchedulerConfig()
        if config.max_kv_bytes is None:
            config = dataclasses.replace(config, max_kv_bytes=default_kv_budget(str(first.device)))
        self.scheduler = Scheduler(config)
        self.models: dict[str, ServedModel] = {first.name: first}
        self.scheduler.shared_kv = HeldKV(lambda: self.models.values(), self.served)
        self.first = first
        self._share_prefixes(first)
        self.requests: dict[str, Request] = {}
        self.last_stats: EngineStats | None = None

    def add_model(self, served: ServedModel) -> None:
        """Serve one more model beside the others, in the same steps."""
        if served.name in self.models:
            raise ValueError(f"model name {served.name!r} is already served")
        self.models[served.name] = served
        self._share_prefixes(served)
        self.scheduler.serve_models(len(self.models))

    def _share_prefixes(self, served: ServedModel) -> None:
        if self.scheduler.config.prefix_cache:
            served.share_prefixes()

    def rename(self, old: str, new: str) -> None:
        """Serve a model under another name (before any request names it), in its place."""
        if new != old and new in self.models:
            raise ValueError(f"model name {new!r} is already served")
        self.models[old].name = new
        self.models = {(new if k == old else k): m for k, m in self.models.items()}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        config: SchedulerConfig | None = None,
        defaults: SamplingParams | None = None,
        progress: bool = True,
        name: str = DEFAULT_NAME,
        compile: bool | str = False,
    ) -> Engine:
        """Load a local checkpoint folder (None: the embedded default model, wherever Marble
        is installed); serving defaults stored with it apply unless given. `device` and
        `dtype` may be "auto" (model/device.py). `compile` runs the model's cached forward
        compiled: True (inductor; CUDA graphs on a GPU) or a torch.compile backend's name."""
        engine = cls.__new__(cls)  # the loaded model as it is: its runner is built once
        device = resolve_device(device)
        served = load_served(path, name, device, dtype, defaults, progress, compile)
        engine._serve(served, config)
        return engine

    # The first model's parts, for callers that serve one model.
    @property
    def model(self) -> torch.nn.Module:
        return self.first.model

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.first.tokenizer

    @property
    def special(self) -> SpecialIds:
        return self.first.special

    @property
    def defaults(self) -> SamplingParams:
        return self.first.defaults

    @property
    def runner(self) -> Runner:
        return self.first.runner

    @property
    def context(self) -> int:
        return self.first.context

    def served(self, model: str | None = None) -> ServedModel:
        """The model a request names (None: the first); KeyError for a name not served."""
        return self.first if model is None else self.models[model]

    # ----------------------------------------------------------------------------- requests
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        suffix: str | list[int] | None = None,
        model: str | None = None,
        constraint: Constraint | None = None,
    ) -> Request:
        """Validate and tokenize without queueing (`build_request`); raises `InvalidParam`
        naming the field. `model` names a served model (None: the first); `constraint` holds
        the output to a structured-output grammar."""
        if model is not None and model not in self.models:
            raise InvalidParam("model", f"model {model!r} is not served here")
        return build_request(self.served(model), prompt, params, request_id, suffix, constraint)

    def add(self, request: Request) -> Request:
        """Queue a request built by `make_request`; raises ValueError or QueueFullError."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # Registered before queueing: the engine thread may finish it right after add().
        self.requests[request.request_id] = request
        try:
            self.scheduler.add(request)
        except Exception:
            self.requests.pop(request.request_id, None)
            raise
        return request

    def abort(self, request_id: str) -> None:
        """The request leaves the batch at the next step boundary."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --------------------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        start = time.perf_counter()
        running, aborted = self.scheduler.schedule()
        outputs = [self._final_output(r) for r in aborted]
        for request, result in self._run(running):
            if isinstance(result, RowStep):
                try:
                    outputs.append(self._postprocess(request, result))
                    continue
                except Exception as exc:
                    log.exception("postprocessing failed for request %s", request.request_id)
                    result = RowError("step_failed", f"{type(exc).__name__}: {exc}")
            # This request fails alone; its batch mates go on.
            log.error("request %s failed: %s", request.request_id, result.message)
            request.error, request.error_code = result.message, result.code
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            outputs.append(self._final_output(request))
        finished: dict[str, int] = {}
        forwards: dict[str, int] = {}
        canvases: list[int] = []
        for out in outputs:
            for kind, n in out.forwards.items():
                forwards[kind] = forwards.get(kind, 0) + n
            if out.finished:
                request = self.requests.pop(out.request_id, None)
                finished[out.finish_reason] = finished.get(out.finish_reason, 0) + 1
                if request is not None:
                    m = self.served(request.model)
                    m.runner.remove(out.request_id)
                    if m.family.canvases:
                        canvases.append(request.blocks_done)
        self.last_stats = EngineStats(
            batch_size=len(running),
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            step_seconds=time.perf_counter() - start,
            tokens_committed=sum(len(o.committed) for o in outputs),
            finished=finished,
            forwards=forwards,
            positions=sum(o.positions for o in outputs),
            cache_bytes=sum(m.runner.cache_bytes for m in self.models.values()),
            canvases=canvases,
            **self.scheduler.shared_kv.summary(),
        )
        return outputs

    def _run(self, running: list[Request]) -> list[tuple[Request, RowStep | RowError]]:
        """Each model's running requests share one runner call, in their running order."""
        results = []
        room = self.scheduler.kv_room
        for m in self.models.values():
            batch = [r for r in running if self.served(r.model) is m]
            if not batch:
                continue
            # Admission reserved the new rows' own slots; spare slots grown with them (a
            # compiled forward's power-of-two counts) take the budget's room or are not made.
            given = m.runner.kv_room.left = max(room, 0)
            for request in batch:
                if request.request_id not in m.runner.rows:
                    m.runner.add(request)
            m.runner.grow_kv()  # now, so the blocks kept below get only what is left
            room -= given - m.runner.kv_room.left
            cache = m.prefixes
            held = cache.nbytes if cache is not None else 0
            if cache is not None:
                # The blocks this step keeps take the budget's room, or an unread older run's.
                cache.capacity = held + max(room, 0)
            results.extend(zip(batch, m.runner.run(batch)))
            if cache is not None:
                room -= cache.nbytes - held
        return results

    def _postprocess(self, request: Request, step: RowStep) -> StepOutput:
        """Apply one row's step to its request: the tokens it shows, its block's progress,
        its stable text and whether it ended."""
        request.num_steps += 1
        forwards = step.forwards or {step.forward: 1}
        for kind, n in forwards.items():
            request.forwards[kind] = request.forwards.get(kind, 0) + n
        request.step_in_block += 1
        tokens = request.tokens
        for c in step.commits:
            tokens[c.pos] = c.token_id
        for change in step.changes:  # edits and remasks of positions filled earlier
            tokens[change.pos] = change.token_id
        block_index = request.block_index
        start, end = request.current_block
        if step.shown is not None:
            tokens[start:end] = step.shown[: end - start]
        filled = all(t != request.mask_id for t in tokens[start:end])
        # A block is final once filled, unless its runner says otherwise (edit rounds, a
        # store forward still to come, a canvas's stop rule).
        final = filled if step.block_final is None else step.block_final
        if step.shown is None:
            remasked = sum(change.op == REMASK for change in step.changes)
            request.num_masked += remasked - len(step.commits)
        else:  # a canvas has no mask: what is not final yet counts as masked
            request.num_masked = len(tokens) - (end if final else start)
        block_completed = None
        if final:
            block_completed = block_index
            request.blocks_done += 1
            if block_index + 1 < len(request.blocks):
                request.block_index += 1
                request.step_in_block = 0
                nstart, nend = request.current_block
                request.masks_at_block_start = nend - nstart
        stable = request.stable_len
        while stable < len(tokens) and tokens[stable] != request.mask_id:
            stable += 1
        if final:
            stable = max(stable, end)
        done = request.num_masked == 0 and final
        if step.block_open and not done:
            stable = min(stable, request.current_block[0])
        text, status = self._settle(request, stable, done)
        m = self.served(request.model)
        incomplete = (
            status is RequestStatus.FINISHED_LENGTH
            and request.constraint is not None
            and not request.constraint.done
        )
        return StepOutput(
            request_id=request.request_id,
            step=request.num_steps,
            total_steps=m.family.planned_steps(request),
            block_index=block_index,
            num_blocks=len(request.blocks),
            committed=step.commits,
            changes=step.changes,
            num_masked=request.num_masked,
            tokens=list(tokens),
            text=text,
            block_completed=block_completed,
            finished=status is not None,
            finish_reason=None if status is None else status.value,
            error_code=CONSTRAINT_INCOMPLETE if incomplete else None,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=completion_len(request),
            heal_text=request.heal_text,
            forward=step.forward,
            positions=step.positions,
            forwards=dict(forwards),
            forwards_total=dict(request.forwards),
            canvas_span=None if step.shown is None else (start, end),
            extras=step.extras,
        )

    def _settle(
        self, request: Request, stable_len: int, complete: bool
    ) -> tuple[str, RequestStatus | None]:
        """`settlement.settle`, and a request that ended leaves the scheduler."""
        text, status = settle(self.served(request.model), request, stable_len, complete)
        if status is not None:
            self.scheduler.finish(request, status)
        return text, status

    def _final_output(self, request: Request) -> StepOutput:
        end = cut(request)
        return StepOutput(
            request_id=request.request_id,
            step=request.num_steps,
            total_steps=self.served(request.model).family.planned_steps(request),
            block_index=request.block_index,
            num_blocks=len(request.blocks),
            committed=[],
            num_masked=request.num_masked,
            tokens=list(request.tokens),
            # An aborted or failed request stops mid-way: keep back what could still change.
            text=held_text(self.served(request.model), request, end),
            finished=True,
            finish_reason=request.status.value,
            error=request.error,
            error_code=request.error_code,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=end,
            heal_text=request.heal_text,
            forwards_total=dict(request.forwards),
        )

    # ------------------------------------------------------------------------------ offline
    def generate(
        self,
        prompts: str | list[int] | Iterable[str | list[int]],
        params: SamplingParams | None = None,
    ) -> Iterator[StepOutput]:
        """Queue the prompts and yield every step output until all of them have finished."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        ids = [self.add(self.make_request(p, params)).request_id for p in prompts]
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    yield out
                    if out.finished:
                        pending.discard(out.request_id)
