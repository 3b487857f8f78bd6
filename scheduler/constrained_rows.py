"""The runner's side of structured output, shared by every family that constrains: the
grammar's token mask for a batch's constrained rows (one tensor, one copy to the device), and
what of a row's picked positions its grammar keeps: the run from its first masked position,
cut where the grammar stops accepting. A runner applies the mask before its sampler and
masks again what was not kept."""

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
    constraint: RowConstraint, picked: Sequence[int], tokens: Sequence[float]
) -> tuple[set[int], int]:
    """A constrained row's picked window columns (ascending, the first its first masked
    position, always picked) and every column's proposal -> (the columns its grammar takes:
    the contiguous run from the first, cut where the grammar stops accepting; the proposals
    it turned away)."""
    run = list(picked[: next((i for i, w in enumerate(picked) if w != picked[0] + i), len(picked))])
    taken = constraint.accept([int(tokens[w]) for w in run])
    return set(run[:taken]), len(run) - taken
