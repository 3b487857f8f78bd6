"""The runner's side of structured output, shared by every family that constrains: the
grammar's token mask for a batch's constrained rows (one tensor, one copy to the device), and
what of a row's picked positions its grammar keeps: the run from its first masked position,
cut where the grammar stops accepting, the rest masked again in the row's canvas. A runner
applies the masks before its sampler and `grammar_run` once the host has the proposals."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from marble.model.sampling import token_mask
from marble.structured.row import RowConstraint


def grammar_masks(
    constraints: Sequence[RowConstraint], lefts: Sequence[int], vocab: int, device: torch.device
) -> Tensor:
    """[n, vocab] bool on `device`: what each row may write at its first masked position,
    with `lefts[i]` positions left for its output (that one included)."""
    cpu = torch.device("cpu")
    masks = [token_mask(c.allowed(left), vocab, cpu) for c, left in zip(constraints, lefts)]
    return torch.stack(masks).to(device)


def mask_frontiers(
    logits: Tensor,
    rows: list[int],
    cols: list[int],
    constraints: Sequence[RowConstraint],
    lefts: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Block-shaped logits [R, W, V]: rows `rows` at their first masked columns `cols` take
    only what their grammars allow next (in place) -> that (rows, cols) index, for the
    runner to force the commits there."""
    dev = logits.device
    at = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
    allowed = grammar_masks(constraints, lefts, logits.shape[-1], dev)
    logits[at] = logits[at].masked_fill(~allowed, float("-inf"))
    return at


def first_masked(tokens: Sequence[int], mask_id: int) -> int:
    """The first generated position still masked (len(tokens) when none is)."""
    return next((g for g, t in enumerate(tokens) if t == mask_id), len(tokens))


def grammar_run(
    constraint: RowConstraint,
    picked: Sequence[float],
    tokens: Sequence[float],
    canvas: Tensor,
    start: int,
    mask_id: int,
) -> tuple[list[bool], int] | None:
    """A constrained row's window after its commit rule: `picked` flags each column (the first
    picked one is its first masked position, always picked), `tokens` each column's proposal.
    Its grammar takes the contiguous run of picks from the first, cut where it stops
    accepting; the other picks are masked again in `canvas` (column c at position start + c)
    -> (the columns kept, as flags; the proposals turned away), or None when the grammar
    takes nothing (the row cannot go on)."""
    cols = [c for c, flag in enumerate(picked) if flag]
    run = cols[: next((i for i, c in enumerate(cols) if c != cols[0] + i), len(cols))]
    taken = constraint.accept([int(tokens[c]) for c in run])
    if not taken:
        return None
    undone = cols[taken:]  # past the run's valid part, and every pick out of the run
    if undone:
        canvas[torch.tensor(undone, device=canvas.device) + start] = mask_id
    kept = set(run[:taken])
    return [c in kept for c in range(len(picked))], len(run) - taken
