"""What a runner returns for one row's step, and what every runner shares: the `Runner`
interface the engine calls (add, remove, run a batch, bytes held), the one step-result type
(commits, changes of filled positions, how far the text is stable, the forward kind, family
extras for the event stream by key), and the retry-each-row-alone isolation of a failed batch.

Every family's runner (`families/<name>/runner.py`) speaks it; none of them is the
interface. No model work here.
"""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from marble.model.kv_slots import KVRoom
from marble.model.prefix_cache import Block, PrefixCache, Segment
from marble.scheduler.request import Request

log = logging.getLogger(__name__)

# The kind of forward a row's step took (a masked model's three, then a uniform-state model's).
FULL, PREFIX_CACHED, DUAL_CACHED = "full", "prefix_cached", "dual_cached"
FORWARD_KINDS = (FULL, PREFIX_CACHED, DUAL_CACHED)
# A uniform-state model's two: the encoder writing finished text into the cache, the decoder
# denoising the canvas against it.
ENCODE, DECODE = "encode", "decode"


class Runner(Protocol):
    """One served model's device-side rows, one per running request."""

    rows: Mapping[str, Any]

    def add(self, request: Request) -> None: ...

    def remove(self, request_id: str) -> None: ...

    def run(self, requests: list[Request]) -> list[RowStep | RowError]:
        """One step for these requests (all added), one result per request in order: a
        `RowStep`, or a `RowError` for a row that failed alone."""
        ...

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV storage held now: the running rows' slots and spare ones."""
        ...

    @property
    def spare_kv_bytes(self) -> int:
        """Bytes of KV storage no running row holds."""
        ...

    def release_kv(self, nbytes: float) -> int:
        """Give up spare KV storage until `nbytes` are freed (or none is left); returns the
        bytes freed."""
        ...

    @property
    def kv_room(self) -> KVRoom:
        """The budget's room for spare KV storage made when rows are added (the engine sets
        it each step)."""
        ...

    def grow_kv(self) -> None:
        """Give the rows added since the last step their KV storage now."""
        ...


@dataclass(frozen=True)
class Commit:
    pos: int  # counted from the first generated position
    token_id: int
    confidence: float
    logprob: float  # log p(token) under the step's (filtered) distribution when committed


# How a shown position changed. Uniform-state models: ACCEPT (a kept candidate), RENOISE
# (noise again), FINAL (the canvas ended). Masked models: COMMIT (a mask filled: `Commit`
# entries), EDIT (a filled position replaced), REMASK (a filled position masked again).
ACCEPT, RENOISE, FINAL = "accept", "renoise", "final"
COMMIT, EDIT, REMASK = "commit", "edit", "remask"


@dataclass(frozen=True)
class Change:
    """A position whose shown token changed this step, other than a commit."""

    pos: int  # counted from the first generated position
    token_id: int  # the token now (the mask id after a REMASK)
    previous: int
    op: str
    # Uniform-state ops: the position's entropy this step (nats). EDIT: the new token's
    # probability; REMASK: the probability the removed token fell to.
    score: float


@dataclass(frozen=True)
class RowError:
    """Why one row's step failed: a stable `code` for clients and metrics, and a message."""

    code: str
    message: str


NON_FINITE_LOGITS = RowError(
    "non_finite_logits", "the model produced non-finite logits (NaN or infinity)"
)
# A constrained request cut by its length before its match was complete (finish "length").
CONSTRAINT_INCOMPLETE = "constraint_incomplete"
CONSTRAINT_UNSATISFIABLE = RowError(
    "constraint_unsatisfiable",
    "no token the model can produce continues the structured output",
)


@dataclass(frozen=True)
class RowStep:
    """One row's step, the one result type of every runner: what changed in what the row
    shows, the forwards that did it, and where its current block stands."""

    commits: list[Commit]  # masks filled this step
    forward: str  # the kind of forward that produced it (the last, if it took several)
    positions: int  # canvas positions this row's forwards computed (queries, CFG copy included)
    changes: list[Change] = field(default_factory=list)  # filled positions changed, after commits
    # Whether the current block is final after this step; None: once it has no mask left
    # (a runner that edits keeps a filled block open for its edit rounds).
    block_final: bool | None = None
    # The current block's filled tokens may change (or its text may not be settled) until it
    # is final: the stable text stops at the block's start until then.
    block_open: bool = False
    # The tokens the current block shows now, in place of commits (a uniform-state canvas,
    # which has no mask); None: the commits and changes say what it shows.
    shown: list[int] | None = None
    # Every forward it took, by kind, when more than the one `forward` names.
    forwards: dict[str, int] | None = None
    # The family's own figures for the event stream, by key (e.g. a canvas's accepted count).
    extras: dict[str, Any] = field(default_factory=dict)


StepResult = RowStep | RowError


R = TypeVar("R")
S = TypeVar("S")


def run_isolated(
    requests: list[Request],
    step: Callable[[list[Request]], list[R]],
    save: Callable[[Request], S],
    restore: Callable[[Request, S], None],
) -> list[R | RowError]:
    """`step(requests)`, one result per request. If the batched call raises, each request
    retries alone from the state `save` took before it (`restore` puts it back), so only the
    rows that raise fail. Shared by every runner."""
    saved = [save(r) for r in requests]
    try:
        return list(step(requests))
    except Exception as exc:
        if len(requests) == 1:
            log.exception("step failed for request %s", requests[0].request_id)
            return [RowError("step_failed", f"{type(exc).__name__}: {exc}")]
        log.warning("batched step failed (%s); retrying its %d rows alone", exc, len(requests))
    results: list[R | RowError] = []
    for request, state in zip(requests, saved):
        restore(request, state)
        results += run_isolated([request], step, save, restore)
    return results


class CachedRowsRunner(ABC):
    """A runner whose rows (`rows[request_id]`) each hold a `cache` (its `nbytes` counted),
    copy themselves with `saved()` and draw from their `generator`; less its batched step."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        # Finished prompt blocks shared across requests, where the family gives it one
        # (`Family.shares_prefixes`); a runner that takes one implements `read_prefix`,
        # `prefix_size`, `cached_positions` and `slot_bytes`.
        self.prefix_cache: PrefixCache | None = None
        # Each row's prompt blocks read in place from the prefix cache, before its slots.
        self.shared: dict[str, list[Segment]] = {}

    def remove(self, request_id: str) -> None:
        self.rows.pop(request_id, None)
        self.shared.pop(request_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.detach(request_id)

    @property
    def reads_in_place(self) -> bool:
        """Whether rows read their cached prompt blocks where they are (`shared`); else they
        take a copy into their slots."""
        return False

    def prefix_size(self, request: Request) -> int:
        """The positions of the request's prefix-cache blocks."""
        raise NotImplementedError

    def cached_positions(self, request: Request) -> int:
        """The positions a row of the request caches, its prompt's included."""
        raise NotImplementedError

    def slot_bytes(self, positions: int) -> int:
        """The KV bytes of a row's slots that hold `positions`."""
        raise NotImplementedError

    def claim_prefix(self, request: Request) -> int:
        """Pin the request's cached prompt blocks until its row ends (it is being admitted);
        returns the KV bytes its row will not hold thanks to them: read in place, its slots
        hold only the positions after them; a copy saves nothing."""
        taken = self.claim_positions(request)
        if not self.reads_in_place:
            return 0
        total = self.cached_positions(request)
        return self.slot_bytes(total) - self.slot_bytes(total - taken)

    def claim_positions(self, request: Request) -> int:
        """`PrefixCache.claim` of the request's prompt: the positions it takes from there."""
        if self.prefix_cache is None or not request.params.prefix_cache:
            return 0
        size = self.prefix_size(request)
        return self.prefix_cache.claim(request.request_id, request.prompt_ids, size)

    def share_in_place(self, request: Request) -> int:
        """A new row's claimed prompt blocks, read where they are from now on (`shared`):
        returns the positions they hold."""
        assert self.prefix_cache is not None
        taken = self.claim_positions(request)
        self.shared[request.request_id] = self.prefix_cache.segments(request.request_id)
        return taken

    def run(self, requests: list[Request]) -> list[RowStep | RowError]:
        """Advance every request by one step; a failed batch retries each row alone from its
        state before the step (`run_rows_isolated`). Then each row that stepped leaves its
        prompt blocks that became final in the prefix cache, and its first step says how many
        prompt positions it took from there (`prompt_cached`)."""
        results = run_rows_isolated(requests, self._step, self.rows)
        if self.prefix_cache is not None:
            for request, result in zip(requests, results):
                if isinstance(result, RowStep):
                    self._share_prompt(request.request_id, result, self.prefix_cache)
        return results

    def _share_prompt(self, key: str, result: RowStep, cache: PrefixCache) -> None:
        taken = cache.report(key)
        if taken is not None:
            result.extras["prompt_cached"] = taken

        def read(start: int, length: int) -> Block:
            return self.read_prefix(key, start, length)

        cache.publish(key, self.rows[key].cache.length, read)

    def read_prefix(self, key: str, start: int, length: int) -> Block:
        """A copy of a row's keys and values at positions [start, start + length)."""
        raise NotImplementedError

    @abstractmethod
    def _step(self, requests: list[Request]) -> list[RowStep | RowError]: ...


def request_generator(request: Request, device: torch.device | str) -> torch.Generator:
    """A row's own random generator, seeded by the request's seed (a random one without):
    the same seed draws the same tokens alone or batched."""
    generator = torch.Generator(device=device)
    seed = request.params.seed
    return generator.manual_seed(seed if seed is not None else secrets.randbits(63))


class CopyableRow(Protocol):
    generator: torch.Generator

    def saved(self) -> CopyableRow: ...


def run_rows_isolated(
    requests: list[Request],
    step: Callable[[list[Request]], list[R]],
    rows: dict[str, CopyableRow],
) -> list[R | RowError]:
    """`run_isolated` for runners whose rows (`rows[request_id]`) copy themselves with
    `saved()` and draw from `generator`: a retry starts from that copy and the generator's
    state before the step."""

    def save(request: Request) -> tuple[CopyableRow, Tensor]:
        row = rows[request.request_id]
        return row.saved(), row.generator.get_state()

    def restore(request: Request, state: tuple[CopyableRow, Tensor]) -> None:
        row, generator = state
        row.generator.set_state(generator)
        rows[request.request_id] = row

    return run_isolated(requests, step, save, restore)
