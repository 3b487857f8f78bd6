"""SDAR's decoding rule as pure, vectorised functions over R rows' current blocks [R, W].

A step samples every block position with the shared `marble.model.sampling.joint_predict`
(generate.py's sampler: logits / T, top-k, top-p, one multinomial per row from its
generator, confidence = the drawn token's probability under that tempered, filtered
distribution; T = 0: the float32 softmax argmax, the goldens' greedy substitute), takes k
from the block length's schedule with `llada_counts` (from B, not from the masks left),
picks masked positions by the row's remasking rule (`select`) and writes the picks
(`commit`); a block with no mask left gets its store call, and a row stops after a block
whose generated region holds a stop id (`first_stop`). Unlike upstream generate.py only
masked positions are ever committed (no overwrite of decoded or prompt tokens). Rows of
different block lengths share one tensor: pad positions are simply never masked. Knows
nothing of models, caches, requests or schedulers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marble.families.sdar.config import Remasking


def select(
    confidence: Tensor, masked: Tensor, k: Tensor, rule: Tensor, threshold: Tensor
) -> Tensor:
    """confidence [R, W], masked bool [R, W], k/rule (Remasking)/threshold [R] -> bool [R, W].

    Only masked positions are ever selected. STATIC: the k most confident (ties: lower index
    first). DYNAMIC: every one with confidence strictly above the threshold when there are at
    least k of them, else the top k. SEQUENTIAL: positions [f, f + k), f the first mask."""
    scores = confidence.float().masked_fill(~masked, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    index = torch.arange(scores.shape[-1], device=scores.device)
    rank = torch.empty_like(order).scatter_(-1, order, index.expand_as(order))
    kk = k[:, None]
    top = (rank < kk) & masked
    above = masked & (confidence > threshold[:, None])
    dynamic = torch.where((above.sum(-1, keepdim=True) >= kk), above, top)
    first = masked.int().argmax(-1, keepdim=True)  # first True; no mask: 0, and nothing masked
    sequential = (index >= first) & (index < first + kk) & masked
    rule = rule[:, None]
    return torch.where(
        rule == Remasking.STATIC,
        top,
        torch.where(rule == Remasking.DYNAMIC, dynamic, sequential),
    )


def commit(block: Tensor, x0: Tensor, selected: Tensor) -> Tensor:
    """block/x0 [R, W], selected bool [R, W] -> the block with x0 written at the selection."""
    return torch.where(selected, x0, block)


def first_stop(generated: Tensor, stop_ids: Tensor) -> Tensor:
    """generated [R, L], stop_ids [S] -> [R] index of each row's first stop id (L: none).

    After a finished block: a row with one stops (upstream tests the whole generated region
    after each block), and its answer is cut there."""
    length = generated.shape[-1]
    index = torch.arange(length, device=generated.device)
    hit = torch.isin(generated, stop_ids)
    return torch.where(hit, index, length).amin(-1)
