"""Finished prompt blocks' keys and values, kept across requests: where a prompt position's keys
and values depend only on the tokens up to the end of its block (block-causal attention, or a
causal encoder), a block computed for one request is the same block for every request whose
prompt starts with the same tokens.

Blocks are keyed by a hash chain over the token ids from position 0 through the block (and the
block size), held least recently used first, and evicted from that end when their bytes are
wanted (`evict`) or past `capacity`. A new row takes the cached run of its prompt's blocks
(`attach`: copied into its own storage, so it computes only what follows); once more of its
prompt blocks are final it leaves them for later rows (`publish`). Only a prompt's full blocks
are ever kept: never one holding generated tokens. Knows nothing of requests or attention.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

# One block's keys and values, in whatever parts the runner keeps them (layer kinds of
# different widths are separate tensors); positions run along dimension 2 of each part.
Block = tuple[Tensor, ...]


@dataclass
class PrefixStats:
    """Running totals since the cache was made (blocks of prompt positions)."""

    hits: int = 0  # blocks a new row took from the cache
    misses: int = 0  # full prompt blocks it did not find (it computes them)
    tokens_saved: int = 0  # prompt positions not computed thanks to hits
    evicted: int = 0  # blocks dropped to make room


@dataclass
class _Row:
    """A row's part: the keys of its prompt's full blocks, how many of them are in the cache
    (taken from it, or left there once final), and the prompt positions it took, until its
    first step has reported them (-1 after)."""

    keys: list[bytes]
    size: int
    published: int
    unreported: int


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


def _nbytes(block: Block) -> int:
    return sum(part.nbytes for part in block)


class PrefixCache:
    """One model's finished prompt blocks (key -> block) and its rows' parts in them."""

    def __init__(self, capacity: float = float("inf")) -> None:
        self.capacity = capacity  # bytes held at most
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixStats()
        self._rows: dict[str, _Row] = {}

    # ------------------------------------------------------------------------- rows
    def attach(
        self, row: str, prompt: Sequence[int], size: int, write: Callable[[int, Block], None]
    ) -> int:
        """A new row's prompt: the cached run of its full blocks from the first is written
        into its storage (`write(start, block)`); returns the positions so filled."""
        keys = chain(prompt, size, len(prompt) // size)
        found = self.lookup(keys)
        for b, block in enumerate(found):
            write(b * size, block)
        self._rows[row] = _Row(keys, size, len(found), len(found) * size)
        return len(found) * size

    def publish(self, row: str, final: int, read: Callable[[int, int], Block]) -> None:
        """The row's first `final` positions are final now: its prompt blocks among them that
        the cache lacks are read (`read(start, length)`, a copy) and kept."""
        part = self._rows.get(row)
        if part is None:
            return
        done = min(final // part.size, len(part.keys))
        for b in range(part.published, done):
            if part.keys[b] not in self.blocks:
                self.insert(part.keys[b], read(b * part.size, part.size))
        part.published = max(part.published, done)

    def report(self, row: str) -> int | None:
        """The prompt positions the row took from the cache, once (its first step's); None
        after that, and for a row that took no part."""
        part = self._rows.get(row)
        if part is None or part.unreported < 0:
            return None
        taken, part.unreported = part.unreported, -1
        return taken

    def detach(self, row: str) -> None:
        self._rows.pop(row, None)

    # ------------------------------------------------------------------------ blocks
    def lookup(self, keys: list[bytes]) -> list[Block]:
        """The cached blocks of the longest run of `keys` from the first (each now most
        recently used); the rest count as misses."""
        found = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None:
                break
            self.blocks.move_to_end(key)
            found.append(block)
        self.stats.hits += len(found)
        self.stats.misses += len(keys) - len(found)
        self.stats.tokens_saved += sum(b[0].shape[2] for b in found)
        return found

    def insert(self, key: bytes, block: Block) -> None:
        """Keep a finished block (a copy the cache owns), evicting the least recently used to
        stay within `capacity`; a block larger than that is not kept."""
        size = _nbytes(block)
        if key in self.blocks or size > self.capacity:
            return
        self.evict(self.nbytes + size - self.capacity)
        self.blocks[key] = block
        self.nbytes += size

    def evict(self, nbytes: float) -> int:
        """Drop least recently used blocks until `nbytes` are freed (or none is left);
        returns the bytes freed."""
        freed = 0
        while freed < nbytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            freed += _nbytes(block)
            self.stats.evicted += 1
        self.nbytes -= freed
        return freed
