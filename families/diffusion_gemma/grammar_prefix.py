"""Structured output on a uniform-state canvas: a constrained row keeps a prefix of its canvas
fixed, the tokens its grammar took, and lets the rest renoise as the sampler decides.

Each step the first position past the prefix takes the best token the grammar allows there
(this step's logits), and the sampler's accepted tokens right after it join while the grammar
accepts them. When the canvas ends (its stop rule fired or its steps ran out) the rest of it
is written the same way, position by position, from the last step's logits, so every canvas
ends as text the grammar accepts; once the match is complete the rest is stop tokens and the
canvas ends at once. Knows the sampler's outputs only as token lists and logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from marble.model.sampling import token_mask
from marble.structured.row import RowConstraint

CANDIDATES = 16  # best tokens per position read back; a position whose none is allowed
# reads its whole row of logits under the grammar's mask instead


@dataclass
class PrefixStep:
    fixed: list[int]  # the canvas's fixed prefix after this step
    rejected: int  # accepted tokens the grammar turned away
    done: bool  # the match is complete: the prefix ends in stop tokens, the canvas is final


def candidates(logits: Tensor) -> Tensor:
    """[L, V] -> [L, CANDIDATES] token ids, best first (read back in the step's transfer)."""
    return logits.topk(min(CANDIDATES, logits.shape[-1]), dim=-1).indices


def grammar_prefix(
    constraint: RowConstraint,
    fixed: list[int],
    shown: Sequence[float],
    kept: Sequence[float],
    best: Sequence[Sequence[float]],
    logits: Tensor,
    positions_left: int,
    final: bool,
) -> PrefixStep | None:
    """Extend a canvas's fixed prefix. `shown` and `kept` are this step's canvas and accepted
    flags, `best` each position's candidates, `logits` [L, V] this step's (device), and
    `positions_left` the output's positions from the canvas's start (at most the canvas's
    length are written). None: the grammar allows nothing at a position (the row cannot go
    on)."""
    limit = min(len(shown), positions_left)
    fixed = list(fixed)
    rejected = 0
    while len(fixed) < limit and not (fixed and fixed[-1] in constraint.stop_ids):
        at = len(fixed)
        left = positions_left - at
        allowed = constraint.allowed(left)
        token = next((int(t) for t in best[at] if _allows(allowed, int(t))), None)
        if token is None:
            mask = token_mask(allowed, logits.shape[-1], logits.device)
            if not bool(mask.any()):
                return None
            token = int(logits[at].masked_fill(~mask, float("-inf")).argmax())
        run = [token]
        if not final:
            nxt = at + 1
            while nxt < limit and kept[nxt]:
                run.append(int(shown[nxt]))
                nxt += 1
        taken = constraint.accept(run)
        if not taken:
            return None
        rejected += len(run) - taken
        fixed += run[:taken]
        if not final:
            break
    done = bool(fixed) and fixed[-1] in constraint.stop_ids
    if done:
        fixed += [fixed[-1]] * (limit - len(fixed))
    return PrefixStep(fixed, rejected, done)


def _allows(allowed: bytes, token: int) -> bool:
    byte = token // 8
    return byte < len(allowed) and bool(allowed[byte] >> (token % 8) & 1)


def write_prefix(canvas: Tensor, fixed: list[int]) -> Tensor:
    """`canvas` [L] with its first len(fixed) tokens replaced (a new tensor)."""
    out = canvas.clone()
    if fixed:
        out[: len(fixed)] = torch.tensor(fixed, dtype=out.dtype, device=out.device)
    return out
