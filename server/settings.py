"""Server settings: CLI flags and `MARBLE_*` environment variables, validated by pydantic.

Owns every knob of the HTTP layer (where the model lives, limits, timeouts, stream sizes).
Knows nothing of requests or the engine's internals.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from marble.scheduler.scheduler import SchedulerConfig


def default_torch_threads() -> int:
    """Torch's CPU threads unless told: every core but one (at least one)."""
    return max(1, (os.cpu_count() or 1) - 1)


class Settings(BaseSettings):
    """`marble serve` flags map one-to-one onto these fields (`--max-batch-size` ->
    `max_batch_size`); each can also come from `MARBLE_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MARBLE_", extra="ignore", protected_namespaces=())

    model: Path | None = None  # checkpoint folder; None = the embedded default model
    served_model_name: str | None = None  # the `model` name clients send; default: folder name
    # More checkpoint folders served beside `model` in the same engine steps, each named by
    # its folder (MARBLE_ALSO_SERVE takes a JSON list).
    also_serve: list[Path] = []
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu
    # The scheduler's limits; their defaults are the scheduler's own.
    max_batch_size: int = Field(SchedulerConfig.max_batch_size, ge=1)
    max_queue: int = Field(SchedulerConfig.max_queue, ge=0)
    max_batch_tokens: int = Field(SchedulerConfig.max_batch_tokens, ge=1)
    # KV cache bytes the running requests may hold together; None: half the GPU memory free
    # after loading, 2 GiB on CPU (model/device.py).
    kv_cache_bytes: int | None = Field(SchedulerConfig.max_kv_bytes, ge=0)
    # Bearer key the /v1 routes (and, unless public_ops, the operations pages) require; None:
    # every route is public. Printable ASCII without spaces: all an HTTP header carries reliably.
    api_key: str | None = None
    # With an api_key: /metrics, /openapi.json and /docs stay public too (/health, /live and
    # the dashboard page always are). Without one everything is public anyway.
    public_ops: bool = False
    # Each model's cached decode forward runs through torch.compile over padded shape buckets
    # (CUDA graphs on a GPU). Off by default: on a CPU the first step of each bucket stalls
    # the engine for tens of seconds compiling, for 5-40% more tokens/s after that on the tiny
    # models measured (benchmarks/compile.py).
    compile: bool = False
    # Keep finished prompt blocks for later requests where that is exact (LLaDA2, SDAR and
    # DiffusionGemma's encoder); they count once against kv_cache_bytes, evicted for requests.
    prefix_cache: bool = SchedulerConfig.prefix_cache
    # Every core but one, left to the event loop and the sockets: on 2 cores, HTTP over
    # in-process tok/s (benchmarks/serve.py) was 1.67x at 1 client and 1.28x at 16 with two
    # torch threads, 1.06-1.07x and 1.02-1.03x with one (the 2-thread engine stalls whenever
    # anything else wants a core).
    torch_threads: int = Field(default_factory=default_torch_threads, ge=1)
    log_level: str = "info"
    # Starts every request id minted here (`r1-<32 hex>`) so a balancer can send attach-by-id
    # to the replica that owns the request (docs/deploy.md, "Scaling out"); None: bare ids.
    replica_id: str | None = Field(None, pattern=r"^[a-z0-9]{1,16}$")

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # larger bodies get 413
    max_n: int = Field(16, ge=1, le=1024)  # choices per request (each an engine request)
    retry_after_s: int = Field(1, ge=0)  # Retry-After on 429/503
    drain_timeout_s: float = Field(30.0, ge=0)  # shutdown waits this long for running requests
    # A request still unfinished this long after submission ends at the next step with
    # finish_reason "error", error_code "deadline_exceeded"; 0 or None: no deadline.
    request_timeout_s: float | None = Field(600.0, ge=0)

    ping_s: float = Field(15.0, ge=0)  # SSE ping comment interval on native streams
    draft_every: int = Field(8, ge=0)  # a `step` event carries the full draft every k steps
    mask_placeholder: str = "\u2592"  # how a still-masked position shows in a draft
    event_log_size: int = Field(2048, ge=16)  # events kept per request for Last-Event-ID
    global_log_size: int = Field(4096, ge=16)  # events kept for the dashboard stream
    subscriber_queue_size: int = Field(256, ge=1)  # pending `step` events before dropping
    # Encoded bytes one stream may have queued: `step` events drop past half, the stream
    # closes past all of it (so 300 stalled listeners hold at most 300 x this).
    subscriber_max_bytes: int = Field(1024 * 1024, ge=16 * 1024)
    retain_finished_s: float = Field(120.0, ge=0)  # finished requests stay attachable this long
    retain_finished_max: int = Field(256, ge=0)  # ... and at most this many of them
    # A connection whose buffers are full and have not drained at all for this long is
    # dropped (its stream ends, its memory is freed): server/stall_guard.py.
    send_timeout_s: float = Field(60.0, gt=0)
    # A request's headers must be complete this long after the connection opened (or the
    # previous response ended), its body this long after its headers; absolute deadlines, so
    # trickling bytes do not extend them: server/connection_guard.py.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    # Connections kept at once; past it the oldest idle one is closed, or the new one gets
    # 503. None: as many as the descriptor limit (RLIMIT_NOFILE) leaves room for; a larger
    # value is lowered to that too.
    max_connections: int | None = Field(None, ge=1)

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: str | None) -> str | None:
        """A key a client can always send: an empty one would switch authentication off, a
        space or control character never survives the header, and non-ASCII only a GET query."""
        if key is None:
            return None
        if not key:
            raise ValueError("the API key is empty (leave it unset to serve without a key)")
        kinds = [
            kind
            for kind, found in (
                ("whitespace", any(c.isspace() for c in key)),
                ("control characters", any(ord(c) < 32 or ord(c) == 127 for c in key)),
                ("non-ASCII characters", any(ord(c) > 127 for c in key)),
            )
            if found
        ]
        if kinds:  # the key itself is never echoed: this message reaches logs
            raise ValueError(
                f"the API key has {' and '.join(kinds)}: it must be printable ASCII without "
                "spaces (what an Authorization: Bearer header carries)"
            )
        return key
