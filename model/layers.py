"""Layers the families' models share: RMSNorm, rotary position tables and their rotate-half
application, and the gated MLP (SwiGLU, or another activation).

Pure torch modules and functions, with the numerics the reference models use (statistics and
rotations in float32). Knows nothing of any family's layout, masks or caches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D]; statistics in float32 as the reference models do."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_tables(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """position_ids [B, L] -> (cos, sin) [B, 1, L, head_dim] in float32."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, Dh] rotated in float32 (rotate-half layout), returned in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate x) * up x), checkpoints' `gate_proj` / `up_proj` / `down_proj`."""

    def __init__(
        self, hidden: int, inner: int, activation: Callable[[Tensor], Tensor] = F.silu
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        """[..., H] -> [..., H]."""
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
