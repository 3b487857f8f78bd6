"""Finished prompt blocks' keys and values, kept across requests: where a prompt position's keys
and values depend only on the tokens up to the end of its block (block-causal attention, or a
causal encoder), a block computed for one request is the same block for every request whose
prompt starts with the same tokens.

Blocks are keyed by a hash chain over the token ids from position 0 through the block (and the
block size). They are held in runs: the blocks one row left in the cache at once, stored
together, following a cut of the run they extend (a tree of runs). A new row claims the runs
of its prompt's cached blocks (`claim`: pinned until it ends) and reads them where they are
(`segments`) or takes a copy (`attach`); once more of its prompt blocks are final it leaves
them as a new run (`publish`). A run no row and no other run reads is evicted least recently
used first when its bytes are wanted (`evict`) or past `capacity`. Only a prompt's full blocks
are ever kept: never one holding generated tokens. Knows nothing of requests or attention.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

# Keys and values of consecutive positions, in whatever parts the runner keeps them (layer
# kinds of different widths are separate tensors); positions run along dimension 2 of each.
Block = tuple[Tensor, ...]


@dataclass
class PrefixStats:
    """Running totals since the cache was made (blocks of prompt positions)."""

    hits: int = 0  # blocks a new row took from the cache
    misses: int = 0  # full prompt blocks it did not find (it computes them)
    tokens_saved: int = 0  # prompt positions not computed thanks to hits
    evicted: int = 0  # blocks dropped to make room


@dataclass(eq=False, repr=False)
class Run:
    """Blocks left in the cache together: positions [start, start + length) of every prompt
    that starts with what `parent` (and its ancestors) hold before `start`, then these."""

    parent: Run | None
    start: int
    keys: list[bytes]
    block: Block
    users: int = 0  # rows reading it and runs that extend it: it is not evicted while any

    @property
    def length(self) -> int:
        return self.block[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.block)


@dataclass(frozen=True)
class Segment:
    """A row's read of a run: its first `length` positions, at absolute `start`."""

    run: Run
    length: int

    @property
    def start(self) -> int:
        return self.run.start

    def parts(self) -> Block:
        """The segment's keys and values: views of the run's storage."""
        return tuple(part[:, :, : self.length] for part in self.run.block)


@dataclass
class _Row:
    """A row's part: the keys of its prompt's full blocks, how many of them are in the cache
    (claimed from it, or left there once final), what it reads there (its last run pinned),
    and the prompt positions it took, until its first step has reported them (-1 after)."""

    keys: list[bytes]
    size: int
    published: int
    path: list[Segment] = field(default_factory=list)
    unreported: int = 0
    counted: bool = False  # its hits and misses are in the stats


def readers(paths: Mapping[str, list[Segment]], keys: list[str]) -> dict[Segment, list[int]]:
    """The segments rows `keys` read (`paths`, by row), each with the indices in `keys` of
    every row that reads it: a step's attention reads each segment once for all of them."""
    found: dict[Segment, list[int]] = {}
    for r, key in enumerate(keys):
        for segment in paths.get(key, ()):
            found.setdefault(segment, []).append(r)
    return found


def chain(tokens: Sequence[int], size: int, blocks: int) -> list[bytes]:
    """The keys of the first `blocks` blocks of `size` tokens: each hashes the one before it
    and its own tokens, so a key names every token from position 0 through its block."""
    keys, previous = [], size.to_bytes(8, "little")
    for b in range(blocks):
        digest = hashlib.blake2b(previous, digest_size=16)
        for token in tokens[b * size : (b + 1) * size]:
            digest.update(token.to_bytes(8, "little"))
        previous = digest.digest()
        keys.append(previous)
    return keys


class PrefixCache:
    """One model's kept runs, its blocks (key -> run and block index) and its rows' parts."""

    def __init__(self, capacity: float = float("inf")) -> None:
        self.capacity = capacity  # bytes held at most (its owner may change it as it goes)
        self.runs: OrderedDict[Run, None] = OrderedDict()  # least recently used first
        self.blocks: dict[bytes, tuple[Run, int]] = {}
        self.nbytes = 0
        self.stats = PrefixStats()
        self._rows: dict[str, _Row] = {}

    # ------------------------------------------------------------------------- rows
    def claim(self, row: str, prompt: Sequence[int], size: int) -> int:
        """The positions of the cached run of a new row's full prompt blocks from the first:
        pinned for the row until `detach` (a second claim returns the first's)."""
        part = self._rows.get(row)
        if part is None:
            keys = chain(prompt, size, len(prompt) // size)
            path = self._lookup(keys)
            part = self._rows[row] = _Row(keys, size, 0, path)
            part.published = sum(s.length for s in path) // size
            if path:
                path[-1].run.users += 1
        return part.published * part.size

    def segments(self, row: str) -> list[Segment]:
        """The claimed positions, in order, as reads of the runs holding them; from now on
        they count as the row's hits (`report`)."""
        part = self._rows[row]
        if not part.counted:
            part.counted = True
            taken = part.published * part.size
            self.stats.hits += part.published
            self.stats.misses += len(part.keys) - part.published
            self.stats.tokens_saved += taken
            part.unreported = taken
        return list(part.path)

    def attach(
        self, row: str, prompt: Sequence[int], size: int, write: Callable[[int, Block], None]
    ) -> int:
        """`claim`, then the claimed positions written into the row's own storage (`write(
        start, parts)`) and the runs let go; returns the positions so filled."""
        taken = self.claim(row, prompt, size)
        for segment in self.segments(row):
            write(segment.start, segment.parts())
        self._unpin(self._rows[row])
        return taken

    def publish(self, row: str, final: int, read: Callable[[int, int], Block]) -> None:
        """The row's first `final` positions are final now: its prompt blocks among them that
        the cache lacks are read (`read(start, length)`, a copy) and kept as one run."""
        part = self._rows.get(row)
        if part is None:
            return
        done = min(final // part.size, len(part.keys))
        # A block's key names every block before it, and a run is kept while another extends
        # it: the blocks the cache lacks are the ones after the last it holds.
        first = part.published
        while first < done and part.keys[first] in self.blocks:
            first += 1
        # Blocks after one the cache dropped (or could not keep) have nothing to extend.
        parent = self.blocks.get(part.keys[first - 1]) if first else None
        if first < done and (parent is not None or first == 0):
            block = read(first * part.size, (done - first) * part.size)
            run = Run(
                parent[0] if parent else None, first * part.size, part.keys[first:done], block
            )
            self._insert(run)
        part.published = max(part.published, done)

    def report(self, row: str) -> int | None:
        """The prompt positions the row took from the cache, once (its first step's); None
        after that, and for a row that took no part."""
        part = self._rows.get(row)
        if part is None or not part.counted or part.unreported < 0:
            return None
        taken, part.unreported = part.unreported, -1
        return taken

    def detach(self, row: str) -> None:
        part = self._rows.pop(row, None)
        if part is not None:
            self._unpin(part)

    def _unpin(self, part: _Row) -> None:
        if part.path:
            part.path[-1].run.users -= 1
            part.path = []

    # ------------------------------------------------------------------------- runs
    def _lookup(self, keys: list[bytes]) -> list[Segment]:
        """The runs holding the longest run of `keys` from the first, as segments (each run
        now most recently used, its ancestors before it)."""
        path: list[Segment] = []
        for key in keys:
            found = self.blocks.get(key)
            if found is None:
                break
            run, index = found
            length = (index + 1) * (run.length // len(run.keys))
            if path and path[-1].run is run:
                path[-1] = Segment(run, length)
            else:
                path.append(Segment(run, length))
        for segment in path:
            self.runs.move_to_end(segment.run)
        return path

    def _insert(self, run: Run) -> None:
        """Keep a run (a copy the cache owns), evicting least recently used runs to stay
        within `capacity`; a run that does not fit is not kept."""
        self.evict(self.nbytes + run.nbytes - self.capacity)
        if self.nbytes + run.nbytes > self.capacity:
            return
        if run.parent is not None:
            run.parent.users += 1
        self.runs[run] = None
        for index, key in enumerate(run.keys):
            self.blocks[key] = (run, index)
        self.nbytes += run.nbytes

    def evict(self, nbytes: float) -> int:
        """Drop runs no row or run reads, least recently used first, until `nbytes` are freed
        (or none is left to drop); returns the bytes freed."""
        freed = 0
        while freed < nbytes:
            run = next((r for r in self.runs if r.users == 0), None)
            if run is None:
                break
            del self.runs[run]
            for key in run.keys:
                del self.blocks[key]
            if run.parent is not None:
                run.parent.users -= 1
            freed += run.nbytes
            self.stats.evicted += len(run.keys)
        self.nbytes -= freed
        return freed
