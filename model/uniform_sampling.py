"""Uniform-state denoising math (DiffusionGemma): pure, vectorised functions over [B, L].

No mask token: a canvas starts as random tokens; each step samples a candidate per position,
accepts the lowest-entropy ones within an entropy budget and re-noises the rest (entropy
bound), or commits greedy candidates cumulatively (block refinement). Random draws come in as
tensors so recorded draws replay exactly; `draw_uniform` and `sampled_positions` make them
from per-row generators.
Knows nothing of models, requests or schedulers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from marble.model.draws import argmax, each_row, multinomial_once, position_chunks


def temperature_schedule(remaining: Tensor, steps: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """remaining/steps [B] int, t_min/t_max [B] float64 -> T [B] float32.

    float32(t_min) + float32(t_max - t_min) * (int32(remaining) / steps): t_max on the first
    step (remaining = steps), t_min + (t_max - t_min) / steps on the last (generate())."""
    frac = remaining.to(torch.int32) / steps
    return t_min.to(torch.float32) + (t_max - t_min).to(torch.float32) * frac


def entropy(logits: Tensor) -> Tensor:
    """logits [B, L, V] -> entropy of their softmax [B, L] (float32)."""
    logp = logits.float().log_softmax(-1)
    return -logp.exp().mul_(logp).sum(-1)  # in place: one vocabulary-sized temporary fewer


def entropy_bound_accept(token_entropy: Tensor, bound: Tensor) -> Tensor:
    """token_entropy [B, L], bound [B] -> accepted [B, L] bool.

    Sort ascending; rank k is accepted iff the k smaller entropies sum to <= bound (computed
    as cumsum - self, as upstream does). Rank 0 is always accepted."""
    sorted_h, order = token_entropy.sort(dim=-1, stable=True)
    before = sorted_h.cumsum(-1) - sorted_h
    accept_sorted = before <= bound[:, None].to(before.dtype)
    accept_sorted[:, 0] = True
    return torch.zeros_like(accept_sorted).scatter(-1, order, accept_sorted)


def renoise(accepted: Tensor, candidates: Tensor, noise: Tensor) -> Tensor:
    """accepted [B, L] bool, candidates/noise [B, L] -> next canvas [B, L]: not sticky."""
    return torch.where(accepted, candidates, noise)


def hold_rows(hold: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """hold [B] bool; old/new [B, ...] -> old where held (frozen rows keep their state)."""
    return torch.where(hold.view(-1, *([1] * (new.dim() - 1))), old, new)


def initial_history(stability: int, batch: int, length: int, device: torch.device) -> Tensor:
    """The stop rule's argmax history [S, B, L], all -1 so the first step is never stable."""
    return torch.full((stability, batch, length), -1, dtype=torch.long, device=device)


def stable_and_confident(
    argmax: Tensor, token_entropy: Tensor, history: Tensor, threshold: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """argmax [B, L], token_entropy [B, L], history [S, B, L], threshold [B] ->
    (fired, stable, confident [B] bool, next history [S, B, L]).

    Stable: argmax equals every history entry (always, with S = 0). Confident: mean entropy
    strictly below the threshold. The history drops its oldest entry and takes argmax."""
    stable = (history == argmax[None]).all(-1).all(0)
    confident = token_entropy.mean(-1) < threshold.to(token_entropy.dtype)
    if history.shape[0]:
        history = torch.cat((history[1:], argmax[None]), dim=0)
    return stable & confident, stable, confident, history


@dataclass
class Positions:
    """Per position, from one pass over its vocabulary row, every field [B, L]."""

    argmax: Tensor  # argmax of the logits
    entropy: Tensor  # float32, of their softmax
    drawn: Tensor  # sampled: a candidate drawn from the softmax; greedy: the softmax's argmax
    confidence: Tensor | None = None  # greedy: the softmax's max


def sampled_positions(scaled: Tensor, generators: Sequence[torch.Generator | None]) -> Positions:
    """scaled logits [B, L, V] (raw / T), row b drawing from generators[b] -> argmax, entropy
    and a candidate per position, the candidates exactly `torch.multinomial(softmax, 1)`'s."""
    rows, length, vocab = scaled.shape
    out = _empty_positions(rows, length, scaled.device)
    chunks = position_chunks(length, vocab, scaled.device)

    def row(b: int) -> None:
        for part in chunks:
            z = scaled[b, part].float()
            probs = z.softmax(-1)
            out.argmax[b, part] = argmax(z)
            out.entropy[b, part] = _entropy(z, probs)
            out.drawn[b, part] = multinomial_once(probs, generators[b])

    each_row(generators, scaled.device, row)
    return out


def greedy_positions(raw: Tensor) -> Positions:
    """raw logits [B, L, V] -> argmax, entropy, and the softmax's argmax and max (block
    refinement's candidate and confidence) per position."""
    rows, length, vocab = raw.shape
    out = _empty_positions(rows, length, raw.device)
    out.confidence = torch.empty(rows, length, device=raw.device)
    for b in range(rows):
        for part in position_chunks(length, vocab, raw.device):
            z = raw[b, part].float()
            probs = z.softmax(-1)
            out.argmax[b, part] = argmax(z)
            out.entropy[b, part] = _entropy(z, probs)
            # The softmax's own argmax: rounding can tie two close logits' probabilities.
            out.drawn[b, part] = top = argmax(probs)
            out.confidence[b, part] = probs.gather(-1, top[:, None])[:, 0]
    return out


def _empty_positions(rows: int, length: int, device: torch.device) -> Positions:
    ids = torch.empty(2, rows, length, dtype=torch.long, device=device)
    return Positions(ids[0], torch.empty(rows, length, device=device), ids[1])


def _entropy(logits: Tensor, probs: Tensor) -> Tensor:
    """logits [N, V] float32 and their softmax -> [N] entropy, from the softmax already made."""
    return -logits.log_softmax(-1).mul_(probs).sum(-1)


@dataclass
class EntropyBoundStep:
    """One entropy-bound step's decisions, every field per row."""

    accepted: Tensor  # [B, L] bool
    canvas: Tensor  # [B, L] the next decoder input


def entropy_bound_step(
    token_entropy: Tensor, candidates: Tensor, noise: Tensor, bound: Tensor
) -> EntropyBoundStep:
    """token_entropy [B, L] of the scaled logits, candidates drawn from their softmax [B, L],
    noise [B, L] uniform tokens, bound [B] -> the step's decisions."""
    accepted = entropy_bound_accept(token_entropy, bound)
    return EntropyBoundStep(accepted, renoise(accepted, candidates, noise))


def finalize_canvas(
    canvas: Tensor, finished: Tensor, eos_ids: Tensor, pad_id: int
) -> tuple[Tensor, Tensor]:
    """canvas [B, L], finished [B] bool, eos_ids [K] -> (appended canvas [B, L], finished [B]).

    Tokens after a row's first EOS become pad (the EOS stays); a row finished before this
    canvas gets all pad; a row with any EOS is finished."""
    is_eos = torch.isin(canvas, eos_ids)
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.int().argmax(-1), canvas.shape[1])
    after = torch.arange(canvas.shape[1], device=canvas.device)[None] > first[:, None]
    out = canvas.masked_fill(after | finished[:, None], pad_id)
    return out, finished | has_eos


def block_refinement_commit(
    confidence: Tensor, committed: Tensor, step: Tensor, steps: Tensor, threshold: Tensor
) -> Tensor:
    """confidence [B, L], committed [B, L] bool, step [B] (0-based), steps [B], threshold [B]
    -> newly committed [B, L] bool.

    Cumulative schedule: the ceil((step + 1) * L / steps) - committed most confident
    uncommitted positions, plus every uncommitted one above the threshold."""
    length = confidence.shape[1]
    target = ((step + 1) * length + steps - 1) // steps  # integer ceil
    quota = (target - committed.sum(-1)).clamp(min=0)  # [B]
    open_conf = confidence.float().masked_fill(committed, float("-inf"))
    order = open_conf.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(length, device=order.device).expand_as(order)
    )
    top = (rank < quota[:, None]) & ~committed
    above = (confidence > threshold[:, None].to(confidence.dtype)) & ~committed
    return top | above


@dataclass
class BlockRefinementStep:
    """One greedy block-refinement step (temperature 0), every field per row."""

    argmax: Tensor  # [B, L] candidates: argmax of the raw logits
    confidence: Tensor  # [B, L] softmax(raw)[argmax]
    commits: Tensor  # [B, L] bool, committed this step
    committed: Tensor  # [B, L] bool, committed so far (sticky)
    canvas: Tensor  # [B, L] the next decoder input


def block_refinement_step(
    confidence: Tensor,
    argmax: Tensor,
    canvas: Tensor,
    committed: Tensor,
    noise: Tensor,
    step: Tensor,
    steps: Tensor,
    threshold: Tensor,
) -> BlockRefinementStep:
    """confidence/argmax [B, L] (the raw logits' softmax max and argmax: `greedy_positions`),
    canvas [B, L], committed [B, L], noise [B, L] -> the step.

    Committed positions keep their token; the rest are re-noised."""
    commits = block_refinement_commit(confidence, committed, step, steps, threshold)
    kept = torch.where(committed, canvas, noise)
    return BlockRefinementStep(
        argmax, confidence, commits, committed | commits, torch.where(commits, argmax, kept)
    )


def tokens_per_forward(generated: Tensor, forwards: Tensor, pad_id: int) -> Tensor:
    """generated [B, N], forwards [B] -> non-pad tokens per counted decoder forward [B]."""
    return (generated != pad_id).sum(-1).float() / forwards.float()


def draw_uniform(
    generators: Sequence[torch.Generator | None], length: int, vocab: int, device: torch.device
) -> Tensor:
    """[B, L] uniform token ids, row b from generators[b] (None: torch's global generator)."""
    rows = [torch.randint(0, vocab, (1, length), generator=g, device=device) for g in generators]
    return torch.cat(rows)
