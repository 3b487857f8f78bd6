"""One denoising step for a batch of block-causal masked requests (LLaDA2), with token editing.

Owns each running request's device-side state: its canvas (the prompt, then masks through the
end of the last block it reaches), its cache of finished blocks, its post-fill step count and
its random generator. Blocks are aligned to absolute positions, so the prompt's tail shares
the first block with the first generated tokens (and is never edited). Attention is
block-causal, so the cache is exact: a step's forward covers what the row's cache still lacks
up to the end of its current block (the prompt's full blocks on the first step; a block that
ended on its post-step budget, whose last forward had not seen its final tokens; then the
current block alone), and the forwards of every row share one batched call that reads their
caches in place (the runner's `SlotStore`). Each step applies LLaDA2.1's joint rule
(model/sampling.py): masks above the threshold are committed and filled positions above the
editing threshold are replaced, both from the same forward; a filled block takes up to
`max_post_steps` mask-free edit rounds and ends once a round changes nothing ("settled": that
forward's keys and values are the block's final ones and go to the cache). One row's failure
fails that row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from marble.families.block_causal import BlockCausalRunner, BlockRow
from marble.families.llada2.model import LLaDA2
from marble.model import sampling
from marble.scheduler.constrained_rows import first_masked, grammar_run, mask_frontiers
from marble.scheduler.request import Request
from marble.scheduler.step_result import (
    CONSTRAINT_UNSATISFIABLE,
    EDIT,
    FULL,
    NON_FINITE_LOGITS,
    PREFIX_CACHED,
    Change,
    Commit,
    RowError,
    RowStep,
)

NEVER = 2.0  # an editing threshold no probability exceeds: editing off


@dataclass
class _BlockRow(BlockRow):
    post: int = 0  # mask-free forwards the current block has taken
    # Masks left in the block that starts at canvas position `masks_at` (host-side, from the
    # last step's host copy), so a step learns whether its block is filled without a read.
    masks: int = 0
    masks_at: int = -1

    def masks_in(self, start: int) -> int:
        """Masks in the block at `start`: counted last step, or, in a block not stepped yet,
        every position past the prompt (no step has written there)."""
        if start == self.masks_at:
            return self.masks
        return start + self.size - max(start, self.prompt_len)


class BlockRunner(BlockCausalRunner):
    rows: dict[str, _BlockRow]

    def __init__(self, model: LLaDA2, mask_id: int, pad_id: int, vocab_limit: int) -> None:
        super().__init__(model, mask_id, pad_id, vocab_limit)
        self._scores: Tensor | None = None  # the LM head's output buffer, reused every step

    def add(self, request: Request) -> None:
        generator, cache, canvas = self.new_row_state(request)
        size = request.params.block_length
        prompt_len = len(request.prompt_ids)
        self.rows[request.request_id] = _BlockRow(generator, cache, canvas, prompt_len, size)

    @torch.inference_mode()
    def _step(self, requests: list[Request]) -> list[RowStep | RowError]:
        rows = [self.rows[r.request_id] for r in requests]
        dev = self.device
        # Each row's current block [s, e) in canvas positions, and its window [a, e): from
        # where its cache ends. Host integers: slicing by them waits on nothing.
        spans = []
        for r, row in zip(requests, rows):
            s = (row.prompt_len + r.current_block[0]) // row.size * row.size
            spans.append((row.cache.length, s, s + row.size))
        width = max(row.size for row in rows)
        longest = max(e - a for a, _, e in spans)
        n = len(rows)
        block = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        for i, (row, (_, s, e)) in enumerate(zip(rows, spans)):
            block[i, : e - s] = row.canvas[s:e]
        col = torch.arange(width, device=dev)
        sizes = torch.tensor([row.size for row in rows], device=dev)
        in_block = col[None, :] < sizes[:, None]
        starts = torch.tensor([s for _, s, _ in spans], device=dev)
        absolute = starts[:, None] + col[None, :]
        active = (block == self.mask_id) & in_block
        protected = absolute < torch.tensor([row.prompt_len for row in rows], device=dev)[:, None]
        protected |= ~in_block
        # A block with no mask left spends one of its edit rounds on this forward.
        for row, (_, s, _) in zip(rows, spans):
            row.post += 0 if row.masks_in(s) else 1

        hidden = self.forward_windows(rows, [(a, e) for a, _, e in spans])
        offsets = torch.tensor([s - a for a, s, _ in spans], device=dev)
        picked_rows = (offsets[:, None] + col[None, :]).clamp_max(longest - 1)
        picked = hidden.gather(1, picked_rows[..., None].expand(-1, -1, hidden.shape[-1]))
        flat = picked.reshape(-1, picked.shape[-1])
        logits = self.model.project(flat, out=self._score_buffer(len(flat))).float()
        logits = logits.view(n, width, -1)
        logits[..., self.mask_id] = float("-inf")
        logits[..., self.vocab_limit :] = float("-inf")

        params = [r.params for r in requests]
        # Structured output: a constrained row's first masked column takes its grammar's mask
        # and always commits; `grammar_run` decides the rest once the host has the proposals.
        # Only what is shown is constrained: a block past max_tokens, or with no mask left (its
        # settling forward), goes by the commit rule alone.
        firsts = {
            i: first_masked(r.tokens, self.mask_id)
            for i, r in enumerate(requests)
            if r.constraint is not None
        }
        constrained = [
            i
            for i, g in firsts.items()
            if g < min(len(requests[i].tokens), spans[i][2] - rows[i].prompt_len)
        ]
        if constrained:
            at = mask_frontiers(
                logits,
                constrained,
                [firsts[i] + rows[i].prompt_len - spans[i][1] for i in constrained],
                [requests[i].constraint for i in constrained],  # type: ignore[misc]
                [requests[i].params.max_tokens - firsts[i] for i in constrained],
            )
        x0, p = sampling.joint_predict(
            logits,
            # float64: a tiny temperature stays positive (sampled at its limit), not 0.
            torch.tensor([q.temperature for q in params], dtype=torch.float64, device=dev),
            torch.tensor([q.top_k for q in params], device=dev),
            torch.tensor([q.top_p for q in params], device=dev),
            [row.generator for row in rows],
            sampling.HostKnobs.of(params),
            consume=True,  # the logits are not read again
        )
        editing = [NEVER if q.editing_threshold is None else q.editing_threshold for q in params]
        step = sampling.joint_select(
            x0,
            p,
            block,
            active,
            protected,
            torch.tensor([q.threshold for q in params], device=dev),
            torch.tensor(editing, device=dev),
            torch.tensor([q.num_to_transfer for q in params], device=dev),
        )
        if constrained:
            step.commit[at] = True
            step.tokens[at] = x0[at]
        settled = sampling.block_settled(active, step.edit)[:, None].expand_as(active)
        broken = (torch.isnan(p) & in_block).any(-1)[:, None].expand_as(active)

        # Everything the host needs from the step, [R, W] each, in one transfer.
        fields = (step.commit, step.edit, step.tokens, block, p, settled, broken)
        host = torch.stack([t.double() for t in fields]).tolist()
        commit, edit, tokens, before, prob, settled, broken = host
        ruled_rows = set(constrained)
        results: list[RowStep | RowError] = []
        for i, (r, row, (a, s, e)) in enumerate(zip(requests, rows, spans)):
            if broken[i][0]:
                results.append(NON_FINITE_LOGITS)
                continue
            size = row.size
            row.canvas = row.canvas.clone()
            row.canvas[s:e] = step.tokens[i, :size]
            undone = 0  # picks its grammar masked again
            extras: dict[str, int] = {}
            if i in ruled_rows:
                picks = int(sum(commit[i][:size]))
                ruled = grammar_run(
                    r.constraint,  # type: ignore[arg-type]
                    commit[i][:size],
                    tokens[i],
                    row.canvas,
                    s,
                    self.mask_id,
                )
                if ruled is None:
                    results.append(CONSTRAINT_UNSATISFIABLE)
                    continue
                commit[i], rejected = ruled
                undone = picks - sum(commit[i])
                extras = {"grammar_rejected": rejected}
            # What the cache lacked before the block is final; the block is too once settled
            # (this forward saw its final tokens).
            kept = (s - a) + (size if settled[i][0] else 0)
            if kept:
                row.cache.advance(kept)
            rounds = r.params.max_post_steps if r.params.editing_threshold is not None else 0
            row.masks, row.masks_at = tokens[i][:size].count(self.mask_id) + undone, s
            final = bool(settled[i][0]) or (not row.masks and row.post + 1 > rounds)
            if final:
                row.post = 0
            gen = row.prompt_len
            limit = r.params.max_tokens  # positions past it are decoded but never shown
            commits = [
                Commit(s + j - gen, int(tokens[i][j]), prob[i][j], _log(prob[i][j]))
                for j in range(size)
                if commit[i][j] and s + j - gen < limit
            ]
            changes = [
                Change(s + j - gen, int(tokens[i][j]), int(before[i][j]), EDIT, prob[i][j])
                for j in range(size)
                if edit[i][j] and s + j - gen < limit
            ]
            kind = FULL if a == 0 else PREFIX_CACHED
            editing = r.params.editing_threshold is not None  # filled tokens may be edited
            results.append(
                RowStep(
                    commits,
                    kind,
                    e - a,
                    changes,
                    block_final=final,
                    block_open=editing,
                    extras=extras,
                )
            )
        return results

    def _score_buffer(self, n: int) -> Tensor:
        if self._scores is None or len(self._scores) < n:
            shape = (n, self.model.cfg.vocab_size)
            self._scores = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._scores[:n]


def _log(p: float) -> float:
    return math.log(p) if p > 0 else float("-inf")
