"""Denoising math: pure, vectorised tensor functions over a batch of candidate windows.

A "window" is the slice of each row's canvas that may be committed this step (the current
block), gathered to [B, W] with a validity mask so rows of different block sizes share one
tensor. Per-row randomness comes in as tensors drawn by the caller from per-row generators
(or, for LLaDA2.1's joint rule, from the generators themselves). The joint rule both unmasks
and edits (replaces filled tokens of the window). Knows nothing of requests, schedulers or
tokenizers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

from marble.model.draws import argmax, draw_candidates

DREAM_EPS = 1e-3  # Dream's final timestep: timesteps = linspace(1, eps, steps + 1)
# At or below this temperature a sampler takes the limit T -> 0+ (see `scale_logits`). Measured
# by benchmarks/cold_temperature.py on LLaDA2 and DiffusionGemma: logits / T gives the limit's
# tokens at every T from 1e-10 to 1e-36 and fails (inf, NaN) from 1e-37 down; 1e-30 leaves six
# decades for logits larger than the tiny checkpoints' (|logit| / T stays in float32 to 1e8).
COLD_TEMPERATURE = 1e-30


class Confidence(IntEnum):
    """How a candidate's confidence is scored; higher = committed first."""

    PROBABILITY = 0  # LLaDA low_confidence / Dream maskgit_plus: p(x0)
    RANDOM = 1  # LLaDA remasking="random": uniform draw
    MARGIN = 2  # Dream topk_margin: p1 - p2
    ENTROPY = 3  # Dream entropy: sum p log p (negative entropy)


@dataclass(frozen=True)
class HostKnobs:
    """Rows' sampler settings as the host holds them (the requests'): the branches a step takes
    are decided from these, not from the device tensors, so deciding them reads nothing back
    from the device (a GPU would otherwise wait for its queue on each)."""

    temperature: Sequence[float]
    top_k: Sequence[int]
    top_p: Sequence[float]

    @classmethod
    def of(cls, settings: Sequence[Any]) -> HostKnobs:
        """From each row's settings (anything with temperature, top_k and top_p)."""
        return cls(
            [q.temperature for q in settings],
            [q.top_k for q in settings],
            [q.top_p for q in settings],
        )

    def rows(self, index: Sequence[int]) -> HostKnobs:
        """The settings of rows `index`, in that order."""
        fields = (self.temperature, self.top_k, self.top_p)
        return HostKnobs(*([values[r] for r in index] for values in fields))

    def top_k_width(self, vocab: int) -> int:
        """How many top logits the top-k filter reads (0: no row filters by top-k)."""
        if not any(k > 0 for k in self.top_k):
            return 0
        return max(min(k, vocab) if k > 0 else vocab for k in self.top_k)

    @property
    def nucleus(self) -> bool:
        return any(p < 1 for p in self.top_p)

    @property
    def maybe_cold(self) -> bool:
        """Whether a row may be at or below COLD_TEMPERATURE once in float32 (a superset: a row
        taken for cold that is not one gets its plain quotient all the same)."""
        return any(0 < t <= 2 * COLD_TEMPERATURE for t in self.temperature)


def filter_top_k_top_p(
    logits: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    k_width: int | None = None,
    nucleus: bool | None = None,
) -> Tensor:
    """logits [B, W, V], top_k [B] (0 = off), top_p [B] (1 = off) -> filtered [B, W, V].

    `k_width` (`HostKnobs.top_k_width`) and `nucleus` (any top_p < 1), when the caller holds
    them, spare the device reads that would decide them."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if k_width is None:
        k_width = int(k.max()) if bool((top_k > 0).any()) else 0
    if k_width:
        kth = logits.topk(k_width, dim=-1).values  # [B, W, kmax]
        cutoff = kth.gather(-1, (k - 1).view(-1, 1, 1).expand(-1, logits.shape[1], 1))
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if nucleus is None:
        nucleus = bool((top_p < 1).any())
    if nucleus:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.float().softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already exceeds top_p; the top-1 always stays.
        drop_sorted = (cum - sorted_logits.float().softmax(-1)) > top_p.view(-1, 1, 1)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_BITS = torch.arange(8, dtype=torch.uint8)


def token_mask(bits: bytes, vocab: int, device: torch.device) -> Tensor:
    """A token bitmask (token 8i + j is bit j of byte i) -> [vocab] bool on `device`."""
    packed = torch.frombuffer(bytearray(bits), dtype=torch.uint8)
    mask = ((packed[:, None] >> _BITS) & 1).reshape(-1)[:vocab].bool()
    return mask.to(device)


def scale_logits(
    logits: Tensor, temperature: Tensor, maybe_cold: bool | None = None, consume: bool = False
) -> Tensor:
    """logits [B, ..., V], temperature [B] (> 0) -> logits / T per row, in torch's result dtype.

    Rows at or below COLD_TEMPERATURE (float32 may have rounded a tiny T to 0) get the limit
    instead: 0 at each position's maxima, the dtype's minimum elsewhere, NaN kept (a broken row
    stays detectable). Its softmax is one-hot (uniform over exact ties) and its entropy 0, where
    the plain quotient overflows to inf and makes both NaN. Other rows: the plain quotient.
    `maybe_cold` False (the caller knows no row is cold) spares the device read that checks.
    `consume`: `logits` is the caller's to overwrite; with no cold row, and `logits` already in
    the result dtype, the quotient is written over it (a vocabulary-sized allocation fewer)."""
    shape = (-1, *([1] * (logits.dim() - 1)))
    t = temperature.view(shape)
    cold = temperature <= COLD_TEMPERATURE
    if maybe_cold is None:
        maybe_cold = bool(cold.any())
    in_place = consume and logits.dtype == torch.promote_types(logits.dtype, temperature.dtype)
    if not maybe_cold:
        return logits.div_(t) if in_place else logits / t
    scaled = logits / t
    top = logits.amax(-1, keepdim=True)
    limit = torch.full_like(scaled, torch.finfo(scaled.dtype).min).masked_fill_(logits == top, 0)
    limit = torch.where(logits.isnan(), logits.to(scaled.dtype), limit)
    return torch.where(cold.view(shape), limit, scaled)


def gumbel_argmax(logits: Tensor, temperature: Tensor, uniform: Tensor | None) -> Tensor:
    """logits [B, W, V], temperature [B], uniform [B, W, V] float64 or None -> x0 [B, W].

    LLaDA's sampler: argmax of exp(logits) / (-log u) ** T in float64, computed in log space
    (logits - T * log(-log u)) so large logits cannot overflow. T = 0 rows take the argmax.
    """
    greedy = logits.argmax(-1)
    if uniform is None:
        return greedy
    t = temperature.to(torch.float64).view(-1, 1, 1)
    noisy = logits.to(torch.float64) - t * torch.log(-torch.log(uniform))
    return torch.where((temperature > 0).view(-1, 1), noisy.argmax(-1), greedy)


def logsumexp_(x: Tensor) -> Tensor:
    """torch.logsumexp over the last dimension, computed in place: `x` is left holding
    exp(x - max). The same operations as torch's, without its vocabulary-sized temporary."""
    top = x.amax(-1, keepdim=True)
    top.masked_fill_(top.isinf(), 0.0)
    return x.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def score_confidence(
    logits: Tensor,
    x0: Tensor,
    kind: Tensor,
    uniform: Tensor | None,
    kinds: Collection[int] | None = None,
    entropy_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """logits [B, W, V] float32, x0 [B, W], kind [B] (Confidence), uniform [B, W] or None ->
    (confidence [B, W], log-probability of x0 [B, W]), both float32.

    Consumes `logits` (see `logsumexp_`): it is the step's one vocabulary-sized tensor.
    log p(x0) = logit(x0) - logsumexp(logits): no [B, W, V] log-softmax is built, except
    for the rows scored by entropy, which need every probability. `kinds` (the kinds present)
    and `entropy_rows` (the rows whose kind is ENTROPY), when the caller holds them, spare
    the device reads that would find them."""
    picked = logits.gather(-1, x0[..., None]).squeeze(-1)
    kinds = set(kind.tolist()) if kinds is None else set(kinds)
    top2 = logits.topk(2, dim=-1).values if Confidence.MARGIN in kinds else None
    neg_entropy = None
    if Confidence.ENTROPY in kinds:
        rows = entropy_rows
        if rows is None:
            rows = (kind == Confidence.ENTROPY).nonzero().flatten()
        scored = logits[rows]
        p = (scored - torch.logsumexp(scored, dim=-1, keepdim=True)).exp()
        neg_entropy = torch.zeros_like(picked)
        neg_entropy[rows] = (p * torch.log(p + 1e-10)).sum(-1)
    lse = logsumexp_(logits)
    logp_x0 = picked - lse
    conf = logp_x0.exp()
    if top2 is not None:
        margin = (top2[..., 0] - lse).exp() - (top2[..., 1] - lse).exp()
        conf = torch.where((kind == Confidence.MARGIN)[:, None], margin, conf)
    if neg_entropy is not None:
        conf = torch.where((kind == Confidence.ENTROPY)[:, None], neg_entropy, conf)
    if Confidence.RANDOM in kinds and uniform is not None:
        conf = torch.where((kind == Confidence.RANDOM)[:, None], uniform.float(), conf)
    return conf, logp_x0


def llada_counts(masks_at_block_start: Tensor, block_steps: Tensor, step: Tensor) -> Tensor:
    """[B] ints -> tokens to commit this step [B]: m // S, plus one for the first m % S steps."""
    base = masks_at_block_start // block_steps
    return base + (step < masks_at_block_start % block_steps).long()


def dream_counts(masked_now: Tensor, t_now: Tensor, t_next: Tensor, last: Tensor) -> Tensor:
    """[B] -> int(n * (1 - s / t)) in float32 as Dream does; the last step takes the rest."""
    k = (masked_now.float() * (1 - t_next / t_now)).long()
    return torch.where(last, masked_now, k)


def dream_timesteps(steps: int) -> list[float]:
    """Dream's float32 timesteps linspace(1, eps, steps + 1), as Python floats."""
    return torch.linspace(1, DREAM_EPS, steps + 1, dtype=torch.float32).tolist()


def select_commits(conf: Tensor, eligible: Tensor, count: Tensor, threshold: Tensor) -> Tensor:
    """conf [B, W], eligible bool [B, W], count [B], threshold [B] (NaN = count rule)
    -> commit bool [B, W].

    Count rule (LLaDA/Dream schedules): the `count` most confident eligible positions.
    Threshold rule (Fast-dLLM): the most confident eligible position, plus every eligible
    position whose confidence reaches the threshold.
    """
    scores = conf.float().masked_fill(~eligible, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    by_count = rank < count[:, None]
    by_threshold = (rank == 0) | (scores >= threshold[:, None])
    use_threshold = ~torch.isnan(threshold)
    return torch.where(use_threshold[:, None], by_threshold, by_count) & eligible


def _rank(scores: Tensor) -> Tensor:
    """scores [B, W] -> each entry's rank in its row, 0 = highest (ties: lower index first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def joint_predict(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    generators: Sequence[torch.Generator | None],
    knobs: HostKnobs | None = None,
    consume: bool = False,
) -> tuple[Tensor, Tensor]:
    """logits [R, W, V], temperature/top_k/top_p [R] -> (x0 [R, W], p [R, W] float32).

    Temperature-0 rows: the argmax and its softmax probability. Others: a draw from
    softmax(top-k/top-p filtered logits / T) with the row's generator (top_k 0 / top_p 1 =
    off; a tiny T: its limit, `scale_logits`), p the drawn token's probability under that
    filtered distribution. `knobs`, the same settings on the host, decide every branch
    without reading the device. `consume`: float32 `logits` may be overwritten (see
    `logsumexp_`), which spares a vocabulary-sized temporary."""
    x0 = argmax(logits)
    picked = logits.gather(-1, x0[..., None]).squeeze(-1).float()
    if knobs is None:
        hot_rows = (temperature > 0).nonzero().flatten().tolist()
        hints: tuple[int | None, bool | None, bool | None] = (None, None, None)
    else:
        hot_rows = [r for r, t in enumerate(knobs.temperature) if t > 0]
        warm = knobs.rows(hot_rows)
        hints = (warm.top_k_width(logits.shape[-1]), warm.nucleus, warm.maybe_cold)
    if hot_rows:
        hot = torch.tensor(hot_rows, dtype=torch.long, device=logits.device)
        scaled = scale_logits(logits[hot].float(), temperature[hot].float(), hints[2], True)
        probs = filter_top_k_top_p(scaled, top_k[hot], top_p[hot], *hints[:2]).softmax(-1)
        drawn = draw_candidates(probs, [generators[r] for r in hot_rows])
    # After the hot rows' copy: a consumed `logits` is garbage from here on.
    lse = logsumexp_(logits.float()) if consume else torch.logsumexp(logits.float(), dim=-1)
    p = (picked - lse).exp()
    if hot_rows:
        x0[hot] = drawn
        p[hot] = probs.gather(-1, drawn[..., None]).squeeze(-1)
    return x0, p


@dataclass(frozen=True)
class JointStep:
    """One step of the joint rule over a block, every field [R, W]."""

    commit: Tensor  # bool: masked positions unmasked to x0
    edit: Tensor  # bool: filled positions replaced by x0
    tokens: Tensor  # the block after the step


def joint_select(
    x0: Tensor,
    p: Tensor,
    block: Tensor,
    active: Tensor,
    protected: Tensor,
    threshold: Tensor,
    editing_threshold: Tensor,
    num_to_transfer: Tensor,
) -> JointStep:
    """LLaDA2.1's unmask + edit: x0, p, block [R, W], active (masked) and protected (prompt
    or padding) bool [R, W], threshold/editing_threshold/num_to_transfer [R] -> JointStep.

    Unmask every active position with p > threshold when there are at least num_to_transfer
    of them, else the top min(num_to_transfer, active) active ones by p. Edit, in the same
    step, every filled unprotected position whose x0 differs with p > editing_threshold."""
    above = active & (p > threshold[:, None])
    count = torch.minimum(num_to_transfer, active.sum(-1))
    top = (_rank(p.float().masked_fill(~active, float("-inf"))) < count[:, None]) & active
    enough = above.sum(-1) >= num_to_transfer
    commit = torch.where(enough[:, None], above, top)
    edit = ~active & ~protected & (p > editing_threshold[:, None]) & (x0 != block)
    return JointStep(commit, edit, torch.where(commit | edit, x0, block))


def post_step_gate(
    active: Tensor, post_steps: Tensor, max_post_steps: Tensor
) -> tuple[Tensor, Tensor]:
    """Before a block's step: active [R, W] at step start, post_steps/max_post_steps [R] ->
    (post_steps [R], over [R] bool). A block with no mask left spends one post-fill step;
    once that exceeds max_post_steps the block ends without a forward."""
    post_steps = post_steps + (~active.any(-1)).long()
    return post_steps, post_steps > max_post_steps


def block_settled(active: Tensor, edit: Tensor) -> Tensor:
    """After a step: active at its start and its edits [R, W] -> [R] bool: the block ends (it
    had no mask, and nothing changed, so this forward saw its final tokens)."""
    return ~active.any(-1) & ~edit.any(-1)


def llada_left(masks_at_block_start: Tensor, block_steps: Tensor, step: Tensor) -> Tensor:
    """[B] ints -> masks the LLaDA count schedule leaves in the block after step `step` (0 from
    its last step on): the sum of `llada_counts` over steps 0..step, taken from the block."""
    m, s = masks_at_block_start, block_steps
    done = m // s * (step + 1) + torch.minimum(step + 1, m % s)
    return (m - done).clamp_min(0)


def verify_remask(prob: Tensor, filled: Tensor, threshold: Tensor, limit: Tensor) -> Tensor:
    """WINO's verify: prob [B, W] of the token each filled position holds, filled bool [B, W],
    threshold [B] (NaN = off), limit [B] -> remask bool [B, W].

    A filled position whose token's probability is below the threshold is masked again,
    lowest probability first (ties: lower index first), at most `limit` per row."""
    below = filled & (prob < threshold[:, None])
    rank = _rank((-prob.float()).masked_fill(~below, float("-inf")))
    return below & (rank < limit[:, None])
