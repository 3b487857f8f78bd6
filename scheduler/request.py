"""Where a request stands (`Request`): its canvas bookkeeping, blocks, step counters and status.

Plain Python bookkeeping: no torch here. What a request asks for is `SamplingParams`
(sampling_params.py). The canvas itself lives in the runner; a request keeps the generated
region as a list of ids (mask id where still masked), its block and step counters, and its
lifecycle status, which only the scheduler changes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from marble.scheduler.sampling_params import SamplingParams
from marble.structured.row import RowConstraint


def blocks_of(gen_length: int, block_length: int | None, offset: int = 0) -> list[tuple[int, int]]:
    """Semi-autoregressive blocks [start, end) over the generated region; the last may be
    short, and so may the first: its first `offset` positions lie before the region."""
    size = gen_length if block_length is None else block_length
    bounds = [0, *range(size - offset, gen_length, size), gen_length]
    return list(zip(bounds[:-1], bounds[1:]))


def steps_per_block(steps: int, gen_length: int, block_sizes: list[int]) -> list[int]:
    """Split a total step budget across blocks in proportion to their size (LLaDA's
    steps / num_blocks when blocks are equal); at least 1 and at most one step per token."""
    return [max(1, min(size, math.ceil(steps * size / gen_length))) for size in block_sizes]


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
    kv_bytes: int = 0  # the KV cache it will hold while it runs (0 without a cache)
    # Structured output: what the generated text must match, and the matcher at its end.
    constraint: RowConstraint | None = None
    model: str | None = None  # the served model it runs on (None: the engine's first)
    # Block-causal models align blocks to absolute positions: the first block begins this
    # many positions before the generated region (the prompt's tail).
    block_offset: int = 0
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
    forwards: dict[str, int] = field(default_factory=dict)  # forwards taken, by kind
    blocks_done: int = 0  # blocks (a uniform-state model's canvases) final so far
    # Engine steps it can take at most (its family's rule, set by the engine); the scheduler
    # classes it long or short by this.
    max_forwards: int = 0
    # time.monotonic() past which it ends with error_code "deadline_exceeded" (None: never).
    deadline: float | None = None

    def __post_init__(self) -> None:
        p = self.params  # validated and bounded by the engine before a Request exists
        self.tokens = [self.mask_id] * p.max_tokens
        self.blocks = blocks_of(p.max_tokens, p.block_length, self.block_offset)
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
