"""What a request asks for (`SamplingParams`) and where it stands (`Request`).

Plain Python bookkeeping: no torch here. The canvas itself lives in the runner; a request keeps
the generated region as a list of ids (mask id where still masked), its block and step
counters, and its lifecycle status, which only the scheduler changes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

REMASKING = ("low_confidence", "random", "margin", "entropy")
# Ceilings on what any request may ask for, whatever the model. They keep every size derived
# from a request checkable in O(1) before anything proportional to it exists; the engine then
# bounds max_tokens by the model's context and top_k by its vocabulary.
MAX_TOKENS = 1 << 20
MAX_STEPS = 1 << 20
MAX_TOP_K = 1 << 24
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 1 << 63  # seeds are in [0, 2**63): torch generators take 64-bit seeds
DEFAULT_THRESHOLD = 0.9


class _Unset:
    """`threshold` not given: it then follows `steps` (see SamplingParams)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
# Names the reference implementations use for the same rules.
REMASKING_ALIASES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}
SCHEDULES = ("llada", "dream")


def blocks_of(gen_length: int, block_length: int | None) -> list[tuple[int, int]]:
    """Semi-autoregressive blocks [start, end) over the generated region; the last may be short."""
    size = gen_length if block_length is None else block_length
    return [(s, min(s + size, gen_length)) for s in range(0, gen_length, size)]


def steps_per_block(steps: int, gen_length: int, block_sizes: list[int]) -> list[int]:
    """Split a total step budget across blocks in proportion to their size (LLaDA's
    steps / num_blocks when blocks are equal); at least 1 and at most one step per token."""
    return [max(1, min(size, math.ceil(steps * size / gen_length))) for size in block_sizes]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request denoising settings; invalid values raise ValueError.

    Defaults: confidence-threshold parallel decoding (0.9) inside semi-autoregressive blocks
    of 32, greedy (temperature 0). One rule picks the commit rule, for every caller: `steps`
    given without `threshold` means the fixed-count schedule over that many forwards (here
    and in `replace`, which is how request fields are merged over serving defaults); an
    explicit `threshold` wins over `steps`; `threshold=None` with `steps=None` is one token per
    step. `block_length=None` denoises the whole generated region as one block.
    `token_healing` moves a text prompt's trailing whitespace token into the canvas (see
    `marble.scheduler.healing`).
    """

    max_tokens: int = 128
    steps: int | None = None
    block_length: int | None = 32
    threshold: float | None = UNSET
    remasking: str = "low_confidence"
    schedule: str = "llada"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    token_healing: bool = False

    def __post_init__(self) -> None:
        if self.threshold is UNSET:
            threshold = None if self.steps is not None else DEFAULT_THRESHOLD
            object.__setattr__(self, "threshold", threshold)
        remasking = REMASKING_ALIASES.get(self.remasking, self.remasking)
        object.__setattr__(self, "remasking", remasking)
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (_int_in(self.max_tokens, 1, MAX_TOKENS), f"max_tokens must be in [1, {MAX_TOKENS}]"),
            (
                self.steps is None or _int_in(self.steps, 1, MAX_STEPS),
                f"steps must be in [1, {MAX_STEPS}]",
            ),
            (
                self.block_length is None or _int_in(self.block_length, 1, MAX_TOKENS),
                f"block_length must be in [1, {MAX_TOKENS}]",
            ),
            (
                self.threshold is None or 0.0 <= self.threshold <= 1.0,
                "threshold must be between 0 and 1",
            ),
            (
                remasking in REMASKING,
                f"remasking must be one of {REMASKING + tuple(REMASKING_ALIASES)}",
            ),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (_int_in(self.top_k, 0, MAX_TOP_K), f"top_k must be in [0, {MAX_TOP_K}] (0: off)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.cfg_scale <= 100.0, "cfg_scale must be between 0 and 100"),
            (
                self.seed is None or _int_in(self.seed, 0, SEED_LIMIT - 1),
                "seed must be in [0, 2**63)",
            ),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (
                all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"stop strings must have 1 to {MAX_STOP_CHARS} characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a mapping (an explicit None means "off" where a field allows it, e.g.
        `threshold`); unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameters: {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (what `from_dict` reads back)."""
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    def replace(self, **changes: Any) -> SamplingParams:
        """These settings with `changes` over them; `steps` given without `threshold` selects
        the fixed-count rule, as in the constructor."""
        if changes.get("steps") is not None and "threshold" not in changes:
            changes["threshold"] = None
        return dataclasses.replace(self, **changes)


def _int_in(value: Any, low: int, high: int) -> bool:
    """An int (not a bool) within [low, high]: checked before any size is derived from it."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    """One generation: prompt (+ optional suffix) around a canvas of `max_tokens` masks."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mask_id: int
    suffix_ids: list[int] = field(default_factory=list)
    # Token healing: the prompt's last token, taken off the prompt; the first generated token
    # must start with its text, which the completion's text then leaves out.
    heal_text: str = ""
    heal_ids: list[int] | None = None  # the tokens allowed at the first generated position
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    error_code: str | None = None
    # Generated region, mask_id where still masked; committed ids never change.
    tokens: list[int] = field(init=False)
    blocks: list[tuple[int, int]] = field(init=False)
    block_steps: list[int] | None = field(init=False)  # None under the threshold rule
    block_index: int = 0
    step_in_block: int = 0
    masks_at_block_start: int = 0
    num_masked: int = field(init=False)
    num_steps: int = 0
    stable_len: int = 0  # leading committed tokens: text that can no longer change
    eos_at: int | None = None  # first EOS/end-of-turn within the stable prefix
    stable_text: str = ""  # decoded stable prefix (up to eos_at), refreshed when it grows
    first_step_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        p = self.params  # validated and bounded by the engine before a Request exists
        self.tokens = [self.mask_id] * p.max_tokens
        self.blocks = blocks_of(p.max_tokens, p.block_length)
        sizes = [end - start for start, end in self.blocks]
        if p.threshold is None:
            self.block_steps = steps_per_block(p.steps or p.max_tokens, p.max_tokens, sizes)
        else:
            self.block_steps = None
        self.masks_at_block_start = sizes[0]
        self.num_masked = p.max_tokens

    @property
    def canvas_len(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens + len(self.suffix_ids)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length as the client sent it, a healed token included."""
        return len(self.prompt_ids) + (1 if self.heal_text else 0)

    @property
    def gen_start(self) -> int:
        """Index of the first generated position within the canvas."""
        return len(self.prompt_ids)

    @property
    def total_steps(self) -> int | None:
        """Planned forwards (None when the threshold rule makes it dynamic)."""
        return None if self.block_steps is None else sum(self.block_steps)

    @property
    def current_block(self) -> tuple[int, int]:
        return self.blocks[self.block_index]

    def is_finished(self) -> bool:
        return self.status.finished
