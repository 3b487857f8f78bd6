"""Categorical draws over a vocabulary, exactly as `torch.multinomial(p, 1)` makes them, at a
fraction of its CPU cost; the argmax they take; and the position chunks a vocabulary pass walks.

torch draws one sample as argmax(p / q) with q ~ Exp(1) (`exponential_`). On CPU that kernel
is a serial loop of scalar logs over the generator's float64 uniforms u, q = -log1p(-u); here
the same uniforms are drawn in one call and transformed by vectorised kernels: the same
numbers, so the same tokens from the same seed, in about half the time. Those uniforms come
from torch's Mersenne Twister one at a time on one core, so on CPU two rows with their own
generators make their passes at once (`each_row`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

# Per CPU vocabulary pass: 2 MB of float32 (4 MB of the draws' float64), so a pass's
# temporaries stay in cache; 8 MB chunks made sampled_positions 1.3x slower (2-core EPYC).
CHUNK_ELEMENTS = 1 << 19
# Rows in flight on CPU: while one row's uniforms are drawn (serial, one core) another row's
# softmax and draw arithmetic takes the other; more rows only multiply torch's thread teams.
ROWS_IN_FLIGHT = 2
_row_pool: ThreadPoolExecutor | None = None


def _forget_row_pool() -> None:
    global _row_pool
    _row_pool = None  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_row_pool)


def position_chunks(positions: int, vocab: int, device: torch.device) -> list[slice]:
    """Slices over `positions` for one pass over their vocabulary rows. On CPU a few MB each:
    the pass is memory-bound and its temporaries stay cache-sized (none vocabulary-sized), and
    at least one position per torch thread, since torch splits a row-wise op by rows.
    Elsewhere one slice: a GPU wants one launch per operation, not one per chunk."""
    if device.type != "cpu":
        size = max(positions, 1)
    else:
        size = max(1, CHUNK_ELEMENTS // vocab, torch.get_num_threads())
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
    return argmax(torch.div(probs, noise, out=noise))


def argmax(x: Tensor, group: int = 128) -> Tensor:
    """torch.argmax over the last dimension (the first index among equal maxima, NaN as the
    greatest). On CPU computed through the maxima of `group`-wide slices: torch's CPU argmax is
    not vectorised and costs about four times a max over [256 x 126,464] logits. Elsewhere
    torch's own, one launch."""
    flat = x.reshape(-1, x.shape[-1])
    n, v = flat.shape
    whole = v // group * group
    if whole == 0 or x.device.type != "cpu":
        return x.argmax(-1)
    best = flat[:, :whole].unflatten(-1, (-1, group)).amax(-1).argmax(-1)  # first best slice
    start = best * group
    inside = flat.gather(1, start[:, None] + torch.arange(group, device=x.device)).argmax(-1)
    out = start + inside
    if whole < v:
        rest_max, rest_at = flat[:, whole:].max(-1)
        top = flat.gather(1, out[:, None])[:, 0]
        later = (rest_max > top) | (rest_max.isnan() & ~top.isnan())
        out = torch.where(later, whole + rest_at, out)
    return out.view(x.shape[:-1])


def draw_candidates(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """probs [B, L, V] -> [B, L] one draw per position, row b from generators[b] (None:
    torch's global generator), positions in order: `torch.multinomial(probs[b], 1)` per row."""
    rows, positions, vocab = probs.shape
    out = torch.empty(rows, positions, dtype=torch.long, device=probs.device)
    chunks = position_chunks(positions, vocab, probs.device)

    def row(b: int) -> None:
        for part in chunks:
            out[b, part] = multinomial_once(probs[b, part], generators[b])

    each_row(generators, probs.device, row)
    return out


def each_row(
    generators: Sequence[torch.Generator | None], device: torch.device, work: Callable[[int], None]
) -> None:
    """work(b) for every row b, whose draws come from generators[b] only; returns when all
    are done. On CPU, when every row has a generator of its own, up to `ROWS_IN_FLIGHT` rows
    (at most torch's thread count) run at once: a row's numbers depend on its generator alone,
    so the results are the same as one row after another. Rows sharing a generator (or the
    global one) keep their order, and a GPU runs them in turn."""
    rows = len(generators)
    in_flight = min(rows, ROWS_IN_FLIGHT, torch.get_num_threads())
    own = None not in generators and len({id(g) for g in generators}) == rows
    if device.type != "cpu" or in_flight < 2 or not own:
        for b in range(rows):
            work(b)
        return
    global _row_pool
    if _row_pool is None:
        _row_pool = ThreadPoolExecutor(ROWS_IN_FLIGHT, thread_name_prefix="marble-rows")
    # Grad and inference modes are per thread: the rows write into the caller's tensors.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(b: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(b)

    # Every row finishes before any error is raised: none may draw after the caller moves on.
    done, _ = wait([_row_pool.submit(run, b) for b in range(rows)])
    for future in done:
        future.result()
