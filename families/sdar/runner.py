"""One forward per row per engine step for a batch of SDAR requests, as upstream's
block_diffusion_generate() makes them, so each request takes upstream's forwards (NFE).

Owns each running request's device-side state: its canvas (the prompt, then masks through the
end of the last block it reaches), its cache of finished blocks, its current block and step in
it, and its random generator. A row's step is one of three forwards: the PREFILL of the
prompt's full blocks (written to the cache, nothing committed; only when the prompt holds one),
a DENOISE of the current block over the cache (nothing written; every position sampled, masked
ones committed by the row's rule, `sampling.py`), or once the block has no mask its STORE (the
block written to the cache, nothing committed, the block final). The rows of one step share one
batched model call whatever their phase, reading their caches in place. The text of a block
settles only once it is stored (`block_open`), as upstream tests for a stop id only then. One
row's failure fails that row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from marble.families.block_causal import BlockCausalRunner, BlockRow
from marble.families.sdar import sampling
from marble.families.sdar.config import Remasking
from marble.model.sampling import HostKnobs, joint_predict, llada_counts
from marble.scheduler.constrained_rows import first_masked, grammar_run, mask_frontiers
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import (
    CONSTRAINT_UNSATISFIABLE,
    ENCODE,
    FULL,
    NON_FINITE_LOGITS,
    PREFIX_CACHED,
    Commit,
    RowError,
    RowStep,
)

PREFILL, DENOISE, STORE = "prefill", "denoise", "store"
# Marble's remasking names of SDAR's rules (the threshold then tells static from dynamic).
LOW_CONFIDENCE, SEQUENTIAL = "low_confidence", "sequential"


@dataclass
class _SDARRow(BlockRow):
    start: int  # the current block's first canvas position
    step: int = 0  # denoising forwards the current block has taken
    masks: int = -1  # masks left in the current block, host-side (-1: none committed yet)

    def masks_left(self) -> int:
        """Without a read of the canvas: a block no step has committed in is masked past the
        prompt; after that, the last step's count."""
        if self.masks >= 0:
            return self.masks
        return self.start + self.size - max(self.start, self.prompt_len)


def rule_of(params: SamplingParams) -> Remasking:
    """The SDAR rule a request's fields ask for: "sequential", else low_confidence_static
    without a threshold and low_confidence_dynamic with one."""
    if params.remasking == SEQUENTIAL:
        return Remasking.SEQUENTIAL
    return Remasking.STATIC if params.threshold is None else Remasking.DYNAMIC


class SDARRunner(BlockCausalRunner):
    rows: dict[str, _SDARRow]

    def add(self, request: Request) -> None:
        generator, cache, canvas = self.new_row_state(request)
        size = request.params.block_length
        prompt_len = len(request.prompt_ids)
        row = _SDARRow(generator, cache, canvas, prompt_len, size, prompt_len // size * size)
        self.rows[request.request_id] = row

    def _phase(self, row: _SDARRow) -> str:
        if row.cache.length < row.start:  # the prompt's full blocks are not cached yet
            return PREFILL
        return DENOISE if row.masks_left() else STORE

    @torch.inference_mode()
    def _step(self, requests: list[Request]) -> list[RowStep | RowError]:
        rows = [self.rows[r.request_id] for r in requests]
        phases = [self._phase(row) for row in rows]
        # Each row's window [a, e): the prompt's full blocks for a prefill, else its block.
        spans = [
            (row.cache.length, row.start) if phase == PREFILL else (row.start, row.start + row.size)
            for row, phase in zip(rows, phases)
        ]
        hidden = self.forward_windows(rows, spans)
        denoising = [i for i, phase in enumerate(phases) if phase == DENOISE]
        decided = self._denoise(requests, rows, denoising, hidden) if denoising else {}

        results: list[RowStep | RowError] = []
        for i, (row, phase, (a, e)) in enumerate(zip(rows, phases, spans)):
            if phase == DENOISE:
                outcome = decided[i]
                if isinstance(outcome, RowError):
                    results.append(outcome)
                    continue
                commits, extras = outcome
                kind = FULL if row.cache.length == 0 else PREFIX_CACHED
                results.append(
                    RowStep(commits, kind, e - a, block_final=False, block_open=True, extras=extras)
                )
                continue
            row.cache.advance(e - a)
            if phase == STORE:
                row.start, row.step, row.masks = e, 0, -1
            final = phase == STORE
            results.append(RowStep([], ENCODE, e - a, block_final=final, block_open=True))
        return results

    def _denoise(
        self, requests: list[Request], rows: list[_SDARRow], index: list[int], hidden: Tensor
    ) -> dict[int, tuple[list[Commit], dict[str, int]] | RowError]:
        """Sample the blocks of the denoising rows (`index` into the batch) and commit by each
        row's rule: their commits and the step's extras (a constrained row's grammar
        rejections), or a RowError for a row that cannot go on."""
        dev = self.device
        picked = [rows[i] for i in index]
        reqs = [requests[i] for i in index]
        width = max(row.size for row in picked)
        # A denoising row's window is its block: its first `size` hidden rows.
        flat = hidden[index, :width].reshape(-1, hidden.shape[-1])
        logits = self.model.project(flat).float().view(len(index), width, -1)
        logits[..., self.mask_id] = float("-inf")
        logits[..., self.vocab_limit :] = float("-inf")
        col = torch.arange(width, device=dev)
        sizes = torch.tensor([row.size for row in picked], device=dev)
        in_block = col[None, :] < sizes[:, None]
        block = torch.full((len(index), width), self.pad_id, dtype=torch.long, device=dev)
        for j, row in enumerate(picked):
            block[j, : row.size] = row.canvas[row.start : row.start + row.size]
        masked = (block == self.mask_id) & in_block

        params = [r.params for r in reqs]
        # Structured output: a constrained row's first masked column takes its grammar's mask
        # and always commits; `grammar_run` decides the rest once the host has the proposals.
        # Only what is shown is constrained: a block past max_tokens goes by its rule alone.
        firsts = {
            j: first_masked(r.tokens, self.mask_id)
            for j, r in enumerate(reqs)
            if r.constraint is not None
        }
        constrained = [j for j, g in firsts.items() if g < len(reqs[j].tokens)]
        if constrained:
            at = mask_frontiers(
                logits,
                constrained,
                [firsts[j] + picked[j].prompt_len - picked[j].start for j in constrained],
                [reqs[j].constraint for j in constrained],  # type: ignore[misc]
                [reqs[j].params.max_tokens - firsts[j] for j in constrained],
            )
        x0 = torch.full((len(index), width), self.pad_id, dtype=torch.long, device=dev)
        p = torch.zeros((len(index), width), dtype=torch.float32, device=dev)
        # One draw per block position, as upstream's one multinomial over [B, V]: rows are
        # sampled by block length, so no row's generator draws for another's padding.
        for size in sorted({row.size for row in picked}):
            group = [j for j, row in enumerate(picked) if row.size == size]
            knobs = [params[j] for j in group]
            whole = len(group) == len(picked) and size == width  # no copy of the logits
            drawn, prob = joint_predict(
                logits if whole else logits[group, :size],
                # float64: a tiny temperature stays positive (sampled at its limit), not 0.
                torch.tensor([q.temperature for q in knobs], dtype=torch.float64, device=dev),
                torch.tensor([q.top_k for q in knobs], device=dev),
                torch.tensor([q.top_p for q in knobs], device=dev),
                [picked[j].generator for j in group],
                HostKnobs.of(knobs),
                consume=True,  # the logits are not read again
            )
            if whole:
                x0, p = drawn, prob
            else:
                x0[group, :size], p[group, :size] = drawn, prob
        k = llada_counts(
            sizes,
            torch.tensor([q.steps for q in params], device=dev),
            torch.tensor([row.step for row in picked], device=dev),
        )
        rule = torch.tensor([rule_of(q) for q in params], device=dev)
        # The threshold only reaches the dynamic rule's rows.
        threshold = torch.tensor([q.threshold or 0.0 for q in params], device=dev)
        chosen = sampling.select(p, masked, k, rule, threshold)
        if constrained:
            chosen[at] = True
        tokens = sampling.commit(block, x0, chosen)
        broken = (torch.isnan(p) & in_block).any(-1)[:, None].expand_as(chosen)

        # Everything the host needs from the step, [R, W] each, in one transfer.
        host = torch.stack([t.double() for t in (chosen, x0, p, broken)]).tolist()
        chosen_host, x0_host, prob, broken_host = host
        ruled_rows = set(constrained)
        decided: dict[int, tuple[list[Commit], dict[str, int]] | RowError] = {}
        extras: dict[int, dict[str, int]] = {}
        for j, (i, r, row) in enumerate(zip(index, reqs, picked)):
            if broken_host[j][0]:
                decided[i] = NON_FINITE_LOGITS
                continue
            s = row.start
            row.canvas = row.canvas.clone()
            row.canvas[s : s + row.size] = tokens[j, : row.size]
            if j in ruled_rows:
                ruled = grammar_run(
                    r.constraint,  # type: ignore[arg-type]
                    chosen_host[j][: row.size],
                    x0_host[j],
                    row.canvas,
                    s,
                    self.mask_id,
                )
                if ruled is None:
                    decided[i] = CONSTRAINT_UNSATISFIABLE
                    continue
                chosen_host[j], rejected = ruled
                extras[i] = {"grammar_rejected": rejected}
            row.step += 1
            row.masks = row.masks_left() - int(sum(chosen_host[j][: row.size]))
            gen = row.prompt_len
            limit = r.params.max_tokens  # positions past it are decoded but never shown
            commits = [
                Commit(s + c - gen, int(x0_host[j][c]), prob[j][c], _log(prob[j][c]))
                for c in range(row.size)
                if chosen_host[j][c] and s + c - gen < limit
            ]
            decided[i] = commits, extras.get(i, {})
        return decided


def _log(p: float) -> float:
    return math.log(p) if p > 0 else float("-inf")
