"""Finished prompt blocks' keys and values, kept across requests: a block-causal model's block
depends only on the tokens up to its end, so one computed for one request is the same block for
every request whose prompt starts with the same tokens.

Blocks are keyed by a hash chain over the token ids from position 0 through the block (and the
block size, which decides what attends to what), held least recently used first, and evicted
from that end when their bytes are wanted (`evict`) or past `capacity`. A hit is copied into
the new row's slot: the row then computes only what follows. Knows nothing of requests or
attention rules.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass
class PrefixStats:
    """Running totals since the cache was made (blocks of prompt positions)."""

    hits: int = 0  # blocks a new row took from the cache
    misses: int = 0  # full prompt blocks it did not find (it computes them)
    tokens_saved: int = 0  # prompt positions not computed thanks to hits
    evicted: int = 0  # blocks dropped to make room


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
    """One model's finished prompt blocks: key -> the block's keys and values, one tensor
    [2 * layers, kv_heads, size, head_dim] (layout is the runner's)."""

    def __init__(self, capacity: float = float("inf")) -> None:
        self.capacity = capacity  # bytes held at most
        self.blocks: OrderedDict[bytes, Tensor] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixStats()

    def lookup(self, keys: list[bytes]) -> list[Tensor]:
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
        if found:
            self.stats.tokens_saved += sum(b.shape[2] for b in found)
        return found

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks

    def insert(self, key: bytes, block: Tensor) -> None:
        """Keep a finished block (a copy the cache owns), evicting the least recently used to
        stay within `capacity`; a block larger than that is not kept."""
        if key in self.blocks or block.nbytes > self.capacity:
            return
        self.evict(self.nbytes + block.nbytes - self.capacity)
        self.blocks[key] = block
        self.nbytes += block.nbytes

    def evict(self, nbytes: float) -> int:
        """Drop least recently used blocks until `nbytes` are freed (or none is left);
        returns the bytes freed."""
        freed = 0
        while freed < nbytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            freed += block.nbytes
            self.stats.evicted += 1
        self.nbytes -= freed
        return freed
