"""Categorical draws over a vocabulary, exactly as `torch.multinomial(p, 1)` makes them, at a
fraction of its CPU cost, and the position chunks a vocabulary pass walks.

torch draws one sample as argmax(p / q) with q ~ Exp(1) (`exponential_`). On CPU that kernel
is a serial loop of scalar logs over the generator's float64 uniforms u, q = -log1p(-u); here
the same uniforms are drawn in one call and transformed by vectorised kernels: the same
numbers, so the same tokens from the same seed, in about half the time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 21  # per CPU vocabulary pass: ~8 MB of float32, so temporaries stay small


def position_chunks(positions: int, vocab: int, device: torch.device) -> list[slice]:
    """Slices over `positions` for one pass over their vocabulary rows. On CPU a few MB each:
    the pass is memory-bound and its temporaries stay cache-sized (none vocabulary-sized).
    Elsewhere one slice: a GPU wants one launch per operation, not one per chunk."""
    size = max(1, CHUNK_ELEMENTS // vocab) if device.type == "cpu" else max(positions, 1)
    return [slice(start, start + size) for start in range(0, positions, size)]


def exponential(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Exp(1) noise shaped and typed like `like`: the numbers `exponential_` draws."""
    if like.device.type != "cpu":
        return torch.empty_like(like).exponential_(generator=generator)
    uniform = torch.rand(like.shape, dtype=torch.float64, generator=generator)
    return uniform.neg_().log1p_().neg_().to(like.dtype)


def multinomial_once(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """probs [N, V] (rows summing to 1) -> [N] one draw per row: what
    `torch.multinomial(probs, 1, generator=generator)` returns, consuming the same numbers.
    A NaN row draws an arbitrary index instead of raising: callers check their logits."""
    noise = exponential(probs, generator)
    return torch.div(probs, noise, out=noise).argmax(-1)


def draw_candidates(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """probs [B, L, V] -> [B, L] one draw per position, row b from generators[b] (None:
    torch's global generator), positions in order: `torch.multinomial(probs[b], 1)` per row."""
    rows, positions, vocab = probs.shape
    out = torch.empty(rows, positions, dtype=torch.long, device=probs.device)
    chunks = position_chunks(positions, vocab, probs.device)
    for b, generator in enumerate(generators):
        for part in chunks:
            out[b, part] = multinomial_once(probs[b, part], generator)
    return out
