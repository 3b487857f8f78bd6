"""Every Prometheus object Marble exports (prefix `marble_`, base units), in one registry.

The engine thread reports each step (`EngineStats` plus that step's outputs); the HTTP layer
reports rejections, disconnects and dropped stream events. Knows nothing of HTTP routes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from marble.model.prefix_cache import PrefixStats
from marble.scheduler.engine import EngineStats, StepOutput
from marble.scheduler.step_result import FORWARD_KINDS

OUTCOMES = ("stop", "length", "abort", "error")
REJECT_REASONS = (
    "invalid",
    "unauthorized",
    "unknown_model",
    "too_large",
    "queue_full",
    "not_ready",
)
ERROR_CODES = ("non_finite_logits", "step_failed", "engine_error", "deadline_exceeded")
STREAM_KINDS = ("generate", "attach", "dashboard", "completions", "chat")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_CANVAS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)  # positions of one canvas (256 in the real model)
_POSITIONS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class Timing:
    """Monotonic timestamps of one engine request; set once each, by the engine thread
    (except `submitted`, set when the request is queued)."""

    submitted: float
    started: float | None = None  # start of the first step that ran it
    first_step: float | None = None  # its first step output
    first_text: float | None = None  # its first non-empty stable text
    finished: float | None = None


# One engine step's outputs, each with its request's timing: what the engine thread hands over.
Delivery = list[tuple[StepOutput, Timing | None]]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # no `*_created` series: they only add noise here
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.running = Gauge(
            "marble_requests_running", "Requests in the running batch.", registry=r
        )
        self.waiting = Gauge(
            "marble_requests_waiting", "Requests in the waiting queue.", registry=r
        )
        self.batch_size = Gauge(
            "marble_batch_size", "Requests in the last denoising step's batch.", registry=r
        )
        self.requests = Counter(
            "marble_requests",
            "Finished engine requests (one per choice) by outcome: stop, length, abort, error.",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "marble_requests_rejected",
            "HTTP requests refused before reaching the engine, by reason.",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "marble_request_errors",
            "Engine requests failed by the engine (finish_reason error), by code: "
            "non_finite_logits, step_failed, engine_error, deadline_exceeded.",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "marble_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "marble_generation_tokens", "Completion tokens of finished requests.", registry=r
        )
        self.steps = Counter(
            "marble_denoising_steps", "Denoising steps run (one batched forward each).", registry=r
        )
        self.disconnects = Counter(
            "marble_client_disconnects",
            "Clients that went away before their request finished (the request is aborted).",
            registry=r,
        )
        self.dropped_events = Counter(
            "marble_dropped_step_events",
            "`step` events not delivered to a slow SSE subscriber.",
            registry=r,
        )
        self.forwards = Counter(
            "marble_forwards",
            "Rows of denoising forwards by kind: full (every position), prefix_cached (the "
            "current block onward against a KV cache), dual_cached (the current block only); "
            "for uniform-state models, encode (a causal pass writing the cache) and decode.",
            ["kind"],
            registry=r,
        )
        self.grammar_rejections = Counter(
            "marble_grammar_rejections",
            "Proposals of structured-output rows their grammar turned away (masked again).",
            registry=r,
        )
        self.positions = Counter(
            "marble_positions_computed",
            "Canvas positions the denoising forwards computed (queries; CFG copies included).",
            registry=r,
        )
        self.positions_per_step = Histogram(
            "marble_positions_computed_per_step",
            "Canvas positions one engine step computed, over all its rows.",
            buckets=_POSITIONS,
            registry=r,
        )
        self.canvas_positions = Histogram(
            "marble_canvas_positions_per_step",
            "Uniform-state models: canvas positions one request's step accepted (op=accepted) "
            "or re-noised (op=renoised).",
            ["op"],
            buckets=_CANVAS,
            registry=r,
        )
        self.corrections = Counter(
            "marble_corrections_total",
            "Masked models: filled positions a step replaced (op=edit, token editing) or masked "
            "again (op=remask, verification).",
            ["op"],
            registry=r,
        )
        self.canvases_per_request = Histogram(
            "marble_canvases_per_request",
            "Uniform-state models: canvases a finished request denoised.",
            buckets=_STEPS,
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "marble_kv_cache_bytes",
            "Bytes of KV storage held: the running requests' slots and spare ones.",
            registry=r,
        )
        self.prefix_blocks = Counter(
            "marble_prefix_cache_blocks",
            "Full prompt blocks (LLaDA2, SDAR; DiffusionGemma's pages) a new request found in "
            "the prefix cache (result=hit, not computed) or not (result=miss), and blocks "
            "evicted to make room (result=evicted).",
            ["result"],
            registry=r,
        )
        self.prefix_tokens_saved = Counter(
            "marble_prefix_cache_tokens_saved",
            "Prompt positions taken from the prefix cache instead of computed.",
            registry=r,
        )
        self.prefix_held_blocks = Gauge(
            "marble_prefix_cache_held_blocks",
            "Blocks the prefix caches hold now.",
            registry=r,
        )
        self.prefix_held_bytes = Gauge(
            "marble_prefix_cache_bytes",
            "Bytes the prefix caches hold now (counted once against the KV budget).",
            registry=r,
        )
        self._prefix_seen = PrefixStats()
        self.kv_cache_budget = Gauge(
            "marble_kv_cache_budget_bytes",
            "Bytes of KV cache the running requests may hold together (admission waits past it).",
            registry=r,
        )
        self.open_streams = Gauge(
            "marble_open_streams",
            "SSE streams open now, by kind: generate, attach (one request's events), "
            "dashboard (every request's), completions, chat (OpenAI).",
            ["kind"],
            registry=r,
        )
        self.queue_time = Histogram(
            "marble_queue_time_seconds",
            "From submission to the start of the request's first denoising step.",
            buckets=_SECONDS,
            registry=r,
        )
        self.time_to_first_step = Histogram(
            "marble_time_to_first_step_seconds",
            "From submission to the request's first step output.",
            buckets=_SECONDS,
            registry=r,
        )
        self.time_to_first_text = Histogram(
            "marble_time_to_first_text_seconds",
            "From submission to the first committed text that can be streamed (stable prefix).",
            buckets=_SECONDS,
            registry=r,
        )
        self.latency = Histogram(
            "marble_e2e_request_latency_seconds",
            "From submission to the request's final output.",
            buckets=_SECONDS,
            registry=r,
        )
        self.step_duration = Histogram(
            "marble_step_duration_seconds",
            "Wall time of one engine step (schedule, forward, commit, detokenize).",
            buckets=_STEP_SECONDS,
            registry=r,
        )
        self.steps_per_request = Histogram(
            "marble_steps_per_request",
            "Denoising steps a finished request took part in.",
            buckets=_STEPS,
            registry=r,
        )
        self.tokens_per_forward = Histogram(
            "marble_tokens_committed_per_forward",
            "Tokens one request committed in one forward (above 1 = parallel decoding).",
            buckets=_TOKENS,
            registry=r,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in STREAM_KINDS:
            self.open_streams.labels(kind)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for kind in FORWARD_KINDS:
            self.forwards.labels(kind)

    def _observe_prefix(self, stats: EngineStats) -> None:
        """The prefix caches' totals since the last step, and what they hold."""
        now, seen = stats.prefix, self._prefix_seen
        for result, field in (("hit", "hits"), ("miss", "misses"), ("evicted", "evicted")):
            self.prefix_blocks.labels(result).inc(getattr(now, field) - getattr(seen, field))
        self.prefix_tokens_saved.inc(now.tokens_saved - seen.tokens_saved)
        self.prefix_held_blocks.set(stats.prefix_blocks)
        self.prefix_held_bytes.set(stats.prefix_bytes)
        self._prefix_seen = dataclasses.replace(now)

    # ------------------------------------------------------------------- engine thread
    def observe_step(
        self,
        stats: EngineStats | None,
        step_start: float,
        now: float,
        outputs: Delivery,
    ) -> None:
        """One engine step; also stamps each request's `Timing` the first time it happens."""
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.batch_size.set(stats.batch_size)
            self.kv_cache_bytes.set(stats.cache_bytes)
            self._observe_prefix(stats)
            if stats.batch_size:
                self.steps.inc()
                self.step_duration.observe(stats.step_seconds)
                self.positions.inc(stats.positions)
                self.positions_per_step.observe(stats.positions)
                for kind, rows in stats.forwards.items():
                    self.forwards.labels(kind).inc(rows)
            for canvases in stats.canvases:
                self.canvases_per_request.observe(canvases)
        for out, timing in outputs:
            ran = out.step > 0 and not (out.finished and out.finish_reason in ("abort", "error"))
            if ran:
                self.grammar_rejections.inc(out.extras.get("grammar_rejected", 0))
            if ran and out.canvas_span is not None:
                for label in ("accepted", "renoised"):
                    self.canvas_positions.labels(label).observe(out.extras.get(label, 0))
            elif ran:
                self.tokens_per_forward.observe(len(out.committed))
                for change in out.changes:
                    self.corrections.labels(change.op).inc()
            if timing is not None:
                if ran and timing.first_step is None:
                    timing.started, timing.first_step = step_start, now
                    self.queue_time.observe(step_start - timing.submitted)
                    self.time_to_first_step.observe(now - timing.submitted)
                if out.text and timing.first_text is None:
                    timing.first_text = now
                    self.time_to_first_text.observe(now - timing.submitted)
            if out.finished:
                self.requests.labels(out.finish_reason or "error").inc()
                if out.finish_reason == "error":
                    self.errors.labels(out.error_code or "engine_error").inc()
                self.prompt_tokens.inc(out.prompt_tokens)
                self.generation_tokens.inc(out.completion_tokens)
                self.steps_per_request.observe(out.step)
                if timing is not None:
                    timing.finished = now
                    self.latency.observe(now - timing.submitted)

    def idle(self, num_waiting: int = 0) -> None:
        self.running.set(0)
        self.waiting.set(num_waiting)
        self.batch_size.set(0)
        self.kv_cache_bytes.set(0)

    # ---------------------------------------------------------------------- event loop
    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
