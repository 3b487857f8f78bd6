"""One denoising step for a batch: pad, forward once, commit tokens per row.

Owns the device-side state of each running request (its canvas and its random generator).
Rows of different prompt lengths, block sizes, schedules and samplers share one left-padded
forward; only the current block of each row is sent through the LM head. One row's failure
(non-finite logits, an exception) fails that row alone: its batch mates step on.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from marble.model.sampling import (
    Confidence,
    dream_counts,
    dream_timesteps,
    filter_top_k_top_p,
    gumbel_argmax,
    llada_counts,
    score_confidence,
    select_commits,
)
from marble.model.transformer import Denoiser
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_CONFIDENCE = {
    "low_confidence": Confidence.PROBABILITY,
    "random": Confidence.RANDOM,
    "margin": Confidence.MARGIN,
    "entropy": Confidence.ENTROPY,
}


@dataclass(frozen=True)
class Commit:
    pos: int  # counted from the first generated position
    token_id: int
    confidence: float
    logprob: float  # log p(token) under the step's (filtered) distribution when committed


@dataclass(frozen=True)
class RowError:
    """Why one row's step failed: a stable `code` for clients and metrics, and a message."""

    code: str
    message: str


StepResult = list[Commit] | RowError


@dataclass
class _Row:
    canvas: Tensor  # [L] prompt + generated region + suffix
    generator: torch.Generator
    first_allowed: Tensor | None = None  # [V] bool: token healing's first-token constraint


class ModelRunner:
    def __init__(self, model: Denoiser, mask_id: int, pad_id: int, vocab_limit: int) -> None:
        self.model = model
        self.mask_id = mask_id
        self.pad_id = pad_id
        # Ids the tokenizer cannot decode (embedding rows past its length) and the mask
        # itself are never committed: a committed mask would never resolve.
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self.rows: dict[str, _Row] = {}
        self._timesteps: dict[int, list[float]] = {}

    def add(self, request: Request) -> None:
        ids = request.prompt_ids + request.tokens + request.suffix_ids
        generator = torch.Generator(device=self.device)
        seed = request.params.seed
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        canvas = torch.tensor(ids, dtype=torch.long, device=self.device)
        allowed = None
        if request.heal_ids is not None:
            allowed = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
            allowed[request.heal_ids] = True
        self.rows[request.request_id] = _Row(canvas, generator, allowed)

    def remove(self, request_id: str) -> None:
        self.rows.pop(request_id, None)

    def _dream_t(self, steps: int, index: int) -> float:
        if steps not in self._timesteps:
            self._timesteps[steps] = dream_timesteps(steps)
        return self._timesteps[steps][index]

    def run(self, requests: list[Request]) -> list[StepResult]:
        """Advance every request by one step: each row's commits in window order, or the error
        that failed it. If the batched step raises, each row retries alone from its state
        before the step (canvas and generator), so only the rows that raise fail."""
        rows = [self.rows[r.request_id] for r in requests]
        saved = [(row.canvas, row.generator.get_state()) for row in rows]
        try:
            return self._step(requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("step failed for request %s", requests[0].request_id)
                return [RowError("step_failed", f"{type(exc).__name__}: {exc}")]
            log.warning("batched step failed (%s); retrying its %d rows alone", exc, len(rows))
        results: list[StepResult] = []
        for request, row, (canvas, state) in zip(requests, rows, saved):
            row.canvas = canvas
            row.generator.set_state(state)
            results += self.run([request])
        return results

    @torch.inference_mode()
    def _step(self, requests: list[Request]) -> list[StepResult]:
        rows = [self.rows[r.request_id] for r in requests]
        dev = self.device
        lengths = torch.tensor([len(r.canvas) for r in rows], device=dev)
        ids = pad_sequence(
            [r.canvas for r in rows],
            batch_first=True,
            padding_value=self.pad_id,
            padding_side="left",
        )
        n = ids.shape[1]
        offsets = n - lengths  # [B] left padding per row
        arange = torch.arange(n, device=dev)
        attention = arange[None, :] >= offsets[:, None]  # [B, L]
        positions = (arange[None, :] - offsets[:, None]).clamp_min(0)

        # Current block of each row, as canvas positions [B, W] with a validity mask.
        starts = [r.gen_start + r.current_block[0] for r in requests]
        sizes = [r.current_block[1] - r.current_block[0] for r in requests]
        width = max(sizes)
        col = torch.arange(width, device=dev)
        valid = col[None, :] < torch.tensor(sizes, device=dev)[:, None]
        win_pos = offsets[:, None] + torch.tensor(starts, device=dev)[:, None] + col[None, :]
        win_pos = torch.where(
            valid, win_pos, offsets[:, None] + torch.tensor(starts, device=dev)[:, None]
        )
        window_ids = ids.gather(1, win_pos)
        eligible = valid & (window_ids == self.mask_id)

        logits = self._forward(requests, ids, attention, positions, offsets, win_pos)
        logits[..., self.mask_id] = float("-inf")
        logits[..., self.vocab_limit :] = float("-inf")
        for b, (r, row) in enumerate(zip(requests, rows)):
            # Window column 0 is the first generated position while block 0 is denoised.
            if row.first_allowed is not None and r.current_block[0] == 0:
                logits[b, 0].masked_fill_(~row.first_allowed, float("-inf"))
        params = [r.params for r in requests]
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        logits = filter_top_k_top_p(logits, top_k, top_p)

        x0 = logits.argmax(-1)
        # Each row draws only its own block's noise from its own generator, so its stream
        # (and its tokens) do not depend on which other requests share the batch.
        sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        if sampled:
            vocab = logits.shape[-1]
            uniform = torch.full((len(sampled), width, vocab), 0.5, dtype=torch.float64, device=dev)
            for i, b in enumerate(sampled):
                uniform[i, : sizes[b]] = torch.rand(
                    (sizes[b], vocab), generator=rows[b].generator, dtype=torch.float64, device=dev
                )
            temps = torch.tensor([params[b].temperature for b in sampled], device=dev)
            x0[sampled] = gumbel_argmax(logits[sampled], temps, uniform)
        kind = torch.tensor([_CONFIDENCE[p.remasking] for p in params], device=dev)
        random_conf = None
        if any(p.remasking == "random" for p in params):
            random_conf = torch.zeros((len(rows), width), device=dev)
            for b, p in enumerate(params):
                if p.remasking == "random":
                    random_conf[b, : sizes[b]] = torch.rand(
                        sizes[b], generator=rows[b].generator, device=dev
                    )
        conf, logprob = score_confidence(logits, x0, kind, random_conf)
        # NaN or infinite logits (a broken checkpoint, an overflow) turn the row's log-softmax
        # into NaN: that row commits nothing and fails; the others are unaffected.
        broken = ((torch.isnan(logprob) | torch.isnan(conf)) & valid).any(-1)  # [B]

        commit = select_commits(
            conf, eligible, self._counts(requests, eligible), self._thresholds(params, dev)
        )
        commit &= ~broken[:, None]
        b_idx, w_idx = commit.nonzero(as_tuple=True)
        ids[b_idx, win_pos[b_idx, w_idx]] = x0[b_idx, w_idx]
        for b, row in enumerate(rows):
            row.canvas = ids[b, int(offsets[b]) :]

        flat = torch.stack(
            [
                b_idx.double(),
                w_idx.double(),
                x0[b_idx, w_idx].double(),
                conf[b_idx, w_idx].double(),
                logprob[b_idx, w_idx].double(),
            ]
        )
        commits: list[StepResult] = [[] for _ in requests]
        for b, w, tok, c, lp in flat.T.tolist():
            r = requests[int(b)]
            commits[int(b)].append(Commit(r.current_block[0] + int(w), int(tok), c, lp))
        for b in broken.nonzero().flatten().tolist():
            commits[b] = RowError(
                "non_finite_logits", "the model produced non-finite logits (NaN or infinity)"
            )
        return commits

    def _forward(
        self,
        requests: list[Request],
        ids: Tensor,
        attention: Tensor,
        positions: Tensor,
        offsets: Tensor,
        win_pos: Tensor,
    ) -> Tensor:
        """Logits [B, W, V] at the window positions, classifier-free guided where asked."""
        guided = [b for b, r in enumerate(requests) if r.params.cfg_scale > 0]
        mask = None if bool(attention.all()) else attention
        if not guided:
            return self.model(ids, mask, positions, gather=win_pos).float()
        # Unconditional copy: every prompt and suffix token becomes a mask (as LLaDA does).
        un_ids = ids[guided].clone()
        for i, b in enumerate(guided):
            r, off = requests[b], int(offsets[b])
            un_ids[i, off : off + r.gen_start] = self.mask_id
            un_ids[i, off + r.gen_start + r.params.max_tokens :] = self.mask_id
        both = torch.cat([ids, un_ids])
        both_mask = None if mask is None else torch.cat([mask, mask[guided]])
        logits = self.model(
            both,
            both_mask,
            torch.cat([positions, positions[guided]]),
            gather=torch.cat([win_pos, win_pos[guided]]),
        ).float()
        cond, uncond = logits[: len(requests)], logits[len(requests) :]
        scale = torch.tensor([requests[b].params.cfg_scale for b in guided], device=ids.device)
        cond[guided] = uncond + (scale.view(-1, 1, 1) + 1) * (cond[guided] - uncond)
        return cond

    def _counts(self, requests: list[Request], eligible: Tensor) -> Tensor:
        """Tokens each count-rule row commits this step [B] (ignored for threshold rows)."""
        dev = eligible.device
        masked_now = eligible.sum(-1)
        steps = [1 if r.block_steps is None else r.block_steps[r.block_index] for r in requests]
        step = [r.step_in_block for r in requests]
        llada = llada_counts(
            torch.tensor([r.masks_at_block_start for r in requests], device=dev),
            torch.tensor(steps, device=dev),
            torch.tensor(step, device=dev),
        )
        dream_rows = [r.params.schedule == "dream" for r in requests]
        if not any(dream_rows):
            return llada
        t_now = [self._dream_t(s, min(i, s)) for s, i in zip(steps, step)]
        t_next = [self._dream_t(s, min(i + 1, s)) for s, i in zip(steps, step)]
        dream = dream_counts(
            masked_now,
            torch.tensor(t_now, dtype=torch.float32, device=dev),
            torch.tensor(t_next, dtype=torch.float32, device=dev),
            torch.tensor([i >= s - 1 for s, i in zip(steps, step)], device=dev),
        )
        return torch.where(torch.tensor(dream_rows, device=dev), dream, llada)

    @staticmethod
    def _thresholds(params: list[SamplingParams], device: torch.device) -> Tensor:
        """[B] thresholds, NaN where the row follows a count schedule."""
        values = [float("nan") if p.threshold is None else p.threshold for p in params]
        return torch.tensor(values, device=device)
