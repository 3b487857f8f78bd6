"""Test helper: LLaDA2.1's generate() as block diffusion over a `BlockCache`, any rows at once.

A stand-in for the scheduler integration, written to replay the goldens: each row advances on
its own (its block, post-fill count, exits), and every live row's step shares one batched
forward against the rows' own caches stacked. A row's window is what its cache lacks up to the
end of its current block: the prompt's full blocks on its first step, a finished block's final
tokens after it ended on the post-step budget (the "extra encode", folded into the next
block's first forward), then the current block alone. A block that ended settled appends the
K/V its last forward computed, since that forward saw its final tokens. Every decision is kept
in a trace for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from marble.families.llada2.config import JointThresholdSettings
from marble.families.llada2.model import LLaDA2
from marble.model import sampling
from marble.model.block_cache import BlockCache, LayerKV

SETTLED, BUDGET = "settled", "post_step_budget"


@dataclass
class ForwardTrace:
    block: int
    post_step: int
    input_block: list[int]
    committed: list[int]  # absolute positions
    edited: list[int]
    block_after: list[int]
    settled: bool


@dataclass
class BlockTrace:
    block: int
    exit: str  # SETTLED or BUDGET
    final_block: list[int]


@dataclass
class Run:
    """One row: its request, its state, and its trace."""

    prompt: list[int]
    settings: JointThresholdSettings
    gen_length: int
    canvas: Tensor  # [num_blocks * block_length]
    cache: BlockCache
    block: int
    post_steps: int = 0
    done: bool = False
    encoded_blocks: int = 0  # blocks whose K/V came from a later forward (budget exits)
    forwards: list[ForwardTrace] = field(default_factory=list)
    blocks: list[BlockTrace] = field(default_factory=list)

    @property
    def span(self) -> tuple[int, int]:
        b = self.settings.block_length
        return self.block * b, (self.block + 1) * b

    @property
    def num_blocks(self) -> int:
        return len(self.canvas) // self.settings.block_length

    def final_ids(self, eos_id: int) -> list[int]:
        """canvas[P : P + G] cut after its first EOS (the EOS kept), as generate() returns."""
        p = len(self.prompt)
        out = self.canvas[p : p + self.gen_length].tolist()
        return out[: out.index(eos_id) + 1] if eos_id in out else out


def start(
    model: LLaDA2,
    prompt: list[int],
    settings: JointThresholdSettings,
    gen_length: int,
    mask_id: int,
) -> Run:
    """A row before its first step: canvas of masks after the prompt, an empty cache."""
    b = settings.block_length
    total = math.ceil((len(prompt) + gen_length) / b) * b
    canvas = torch.full((total,), mask_id, dtype=torch.long)
    canvas[: len(prompt)] = torch.tensor(prompt)
    return Run(prompt, settings, gen_length, canvas, model.new_cache(1), len(prompt) // b)


def _end_block(run: Run, exit: str, eos_id: int, mask_id: int) -> None:
    s, e = run.span
    run.blocks.append(BlockTrace(run.block, exit, run.canvas[s:e].tolist()))
    generated = run.canvas[len(run.prompt) : e]
    stop = run.settings.eos_early_stop and bool(
        (generated != mask_id).all() & (generated == eos_id).any()
    )
    run.block, run.post_steps = run.block + 1, 0
    run.done = stop or run.block == run.num_blocks
    if exit == BUDGET and not run.done:
        run.encoded_blocks += 1


def _gate(runs: list[Run], mask_id: int, eos_id: int) -> list[Run]:
    """Count each row's post-fill step; rows over budget end their block without a forward.
    -> the rows that need a forward this step."""
    live = [r for r in runs if not r.done]
    if not live:
        return []
    blocks = torch.stack([r.canvas[slice(*r.span)] for r in live])
    post, over = sampling.post_step_gate(
        blocks == mask_id,
        torch.tensor([r.post_steps for r in live]),
        torch.tensor([r.settings.max_post_steps for r in live]),
    )
    for run, count, ends in zip(live, post.tolist(), over.tolist()):
        run.post_steps = count
        if ends:
            _end_block(run, BUDGET, eos_id, mask_id)
    # A block just started has masks, so these rows pass the gate at once.
    return [r for r in live if not r.done]


def step(model: LLaDA2, runs: list[Run], mask_id: int, eos_id: int) -> bool:
    """One batched forward for every live row; False once every row is done."""
    live = _gate(runs, mask_id, eos_id)
    if not live:
        return False
    width = live[0].settings.block_length
    if any(r.settings.block_length != width for r in live):
        raise ValueError("this replay batches rows of one block length")
    starts = [r.cache.length for r in live]  # each window begins where its cache ends
    ends = [r.span[1] for r in live]
    t = max(e - a for a, e in zip(starts, ends))
    ids = torch.full((len(live), t), mask_id, dtype=torch.long)
    positions = torch.zeros(len(live), t, dtype=torch.long)
    key_valid = torch.zeros(len(live), t, dtype=torch.bool)
    for i, (run, a, e) in enumerate(zip(live, starts, ends)):  # right padding
        ids[i, : e - a] = run.canvas[a:e]
        positions[i, : e - a] = torch.arange(a, e)
        key_valid[i, : e - a] = True
    cache = live[0].cache if len(live) == 1 else BlockCache.stack([r.cache for r in live])
    keep: list[LayerKV] = []
    hidden = model(ids, positions, cache, block_length=width, key_valid=key_valid, keep=keep)
    offset = torch.tensor([r.span[0] - a for r, a in zip(live, starts)])  # block in window
    rows = offset[:, None] + torch.arange(width)
    picked = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.project(picked.reshape(-1, picked.shape[-1])).view(len(live), width, -1)

    settings = [r.settings for r in live]
    x0, p = sampling.joint_predict(
        logits.float(),
        torch.tensor([s.temperature for s in settings]),
        torch.zeros(len(live), dtype=torch.long),
        torch.ones(len(live)),
        [None] * len(live),  # the goldens are greedy
    )
    block = torch.stack([r.canvas[slice(*r.span)] for r in live])
    absolute = torch.stack([torch.arange(*r.span) for r in live])
    active = block == mask_id
    result = sampling.joint_select(
        x0,
        p,
        block,
        active,
        absolute < torch.tensor([len(r.prompt) for r in live])[:, None],
        torch.tensor([s.threshold for s in settings]),
        torch.tensor([s.editing_threshold for s in settings]),
        torch.tensor([s.num_to_transfer for s in settings]),
    )
    settled = sampling.block_settled(active, result.edit).tolist()

    for i, run in enumerate(live):
        s, e = run.span
        run.canvas[s:e] = result.tokens[i]
        run.forwards.append(
            ForwardTrace(
                block=run.block,
                post_step=run.post_steps,
                input_block=block[i].tolist(),
                committed=absolute[i][result.commit[i]].tolist(),
                edited=absolute[i][result.edit[i]].tolist(),
                block_after=result.tokens[i].tolist(),
                settled=settled[i],
            )
        )
        n = int(offset[i])
        # What the cache lacked before the current block, then (settled: this forward saw
        # the final tokens) the block itself.
        kept = n + width if settled[i] else n
        if kept:
            run.cache.append([kv.part([i], 0, kept) for kv in keep])
        if settled[i]:
            _end_block(run, SETTLED, eos_id, mask_id)
    return True


def generate(model: LLaDA2, runs: list[Run], mask_id: int, eos_id: int) -> int:
    """Run every row to its end -> the number of batched forwards made."""
    calls = 0
    while step(model, runs, mask_id, eos_id):
        calls += 1
    return calls
