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
