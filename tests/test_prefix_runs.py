"""The prefix cache's runs under a random walk of rows (claim, publish, detach) and evictions:
whatever the order, every row reads exactly its own prompt's keys and values through its
segments, a run a row or another run reads is never dropped, and the byte and pin counts stay
what the runs say. The keys and values here are a function of the tokens up to each position,
as a block-causal model's are, so a wrong segment or cut shows as wrong numbers."""

from __future__ import annotations

import random

import pytest
import torch

from marble.model.prefix_cache import PrefixCache

SIZE = 2  # positions per block


def kv(prompt: list[int], start: int, length: int) -> tuple[torch.Tensor]:
    """What a model would compute for positions [start, start + length): one number per
    position naming every token up to it, [1, 1, length, 1]."""
    values = [float(hash(tuple(prompt[: p + 1])) % 100_003) for p in range(start, start + length)]
    return (torch.tensor(values).view(1, 1, length, 1),)


def check(cache: PrefixCache, rows: dict[str, list[int]]) -> None:
    assert cache.nbytes == sum(run.nbytes for run in cache.runs) <= cache.capacity
    for run in cache.runs:
        pins = sum(1 for r in cache._rows.values() if r.path and r.path[-1].run is run)
        children = sum(1 for other in cache.runs if other.parent is run)
        assert run.users == pins + children
        assert run.parent is None or run.parent in cache.runs
        for index, key in enumerate(run.keys):
            assert cache.blocks[key] == (run, index)
    for key, prompt in rows.items():
        part = cache._rows[key]
        at = 0
        for segment in part.path:  # consecutive positions from 0, each its prompt's
            assert segment.run in cache.runs and segment.start == at
            (got,) = segment.parts()
            assert torch.equal(got, kv(prompt, at, segment.length)[0])
            at += segment.length


@pytest.mark.parametrize("seed", range(16))
def test_a_random_walk_keeps_every_row_reading_its_own_prompt(seed: int):
    rng = random.Random(seed)
    cache = PrefixCache(capacity=rng.choice([64, 160, 10_000]) * 4)
    rows: dict[str, list[int]] = {}
    heads = [[rng.randrange(3) for _ in range(rng.randrange(2, 9))] for _ in range(4)]
    for step in range(400):
        op = rng.random()
        if op < 0.4 or not rows:  # a new row: a shared head, then its own tokens
            key = f"r{step}"
            prompt = rng.choice(heads) + [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
            rows[key] = prompt
            taken = cache.claim(key, prompt, SIZE)
            assert taken % SIZE == 0 and taken <= len(prompt)
            cache.segments(key)
        elif op < 0.7:  # a row's prompt blocks become final (some or all)
            key = rng.choice(list(rows))
            prompt = rows[key]
            final = rng.randrange(len(prompt) + 1)

            def read(start: int, length: int, prompt: list[int] = prompt):
                return kv(prompt, start, length)

            cache.publish(key, final, read)
        elif op < 0.9:  # a row ends
            key = rng.choice(list(rows))
            cache.detach(key)
            del rows[key]
        else:  # a request wants room
            cache.evict(rng.randrange(1, 64))
        check(cache, rows)
    for key in list(rows):
        cache.detach(key)
    cache.evict(float("inf"))
    assert not cache.runs and not cache.blocks and cache.nbytes == 0
