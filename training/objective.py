"""The masked-diffusion (LLaDA/MDLM) training objective as pure tensor functions.

Given clean sequences x0 [B, L], a per-row mask rate t and a per-row clean-prefix length, it
builds the noised canvas and the 1/t-weighted cross-entropy on masked positions, normalised
by the number of positions that could have been masked. Knows no files, tokenizers or loops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from marble.families.masked.model import Denoiser
from marble.model.layers import rotary_tables


def stratified_t(batch: int, eps: float, generator: torch.Generator) -> Tensor:
    """[B] mask rates in (eps, 1], one per stratum of [0, 1): lower variance than i.i.d."""
    u = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    return eps + (1 - eps) * u[torch.randperm(batch, generator=generator)]


def noise(
    x0: Tensor, t: Tensor, prefix_len: Tensor, mask_id: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """x0 [B, L], t [B], prefix_len [B] -> (canvas [B, L], masked bool [B, L], eligible [B, L]).

    Positions before `prefix_len` stay clean (the prompt); every other position is masked
    independently with probability t.
    """
    b, n = x0.shape
    eligible = torch.arange(n)[None, :] >= prefix_len[:, None]
    masked = (torch.rand(b, n, generator=generator) < t[:, None]) & eligible
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, eligible


def features(model: Denoiser, input_ids: Tensor) -> Tensor:
    """[B, L] -> final hidden states [B, L, D]; `Denoiser.forward` without the head.

    Training scores only masked positions, so it applies `lm_head` to those rows alone
    (tests check this matches `model(input_ids)`).
    """
    b, n = input_ids.shape
    position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
    rope = rotary_tables(position_ids, model.cfg.head_dim, model.cfg.rope_theta)
    x = model.embed(input_ids)
    for layer in model.layers:
        x = layer(x, rope, None)
    return model.norm(x)


def masked_loss(
    model: Denoiser,
    x0: Tensor,
    canvas: Tensor,
    masked: Tensor,
    eligible: Tensor,
    t: Tensor,
    trunk: Callable[[Denoiser, Tensor], Tensor] | None = None,
) -> Tensor:
    """Scalar: sum over masked positions of CE / t, divided by the number of eligible positions.

    Its expectation over t and masks is the per-token negative ELBO (an upper bound on nats
    per token). `trunk` may be a compiled `features`.
    """
    hidden = (trunk or features)(model, canvas)
    rows, cols = masked.nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols]).float()
    ce = F.cross_entropy(logits, x0[rows, cols], reduction="none")
    return (ce / t[rows]).sum() / eligible.sum().clamp_min(1)
