"""SDAR's denoiser: Qwen3 with block-causal attention over a cache of finished blocks.

One forward runs a window of tokens per row (the prompt's full blocks, or the current block)
against a `BlockCache` of earlier blocks: every query sees the cache's valid slots and, inside
the window, the valid keys of its own and earlier blocks (bidirectional inside a block, causal
across blocks, as SDAR is trained). Layers: RMSNorm, q/k/v projections with per-head q/k
RMSNorm before full rotate-half RoPE at absolute positions, GQA, a SwiGLU MLP. Logits are
position-aligned (logits[i] scores the token at i) and computed only for the hidden states the
caller projects. Knows nothing of sampling, tokenizers or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble.families.sdar.config import SDARConfig
from marble.model.block_cache import BlockCache, LayerKV
from marble.model.layers import GatedMLP, RMSNorm, apply_rotary, rotary_tables


class Attention(nn.Module):
    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] -> q [B, Hq, T, D], k and v [B, Hkv, T, D]; q/k normed, then rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, S, D], additive bias [B, 1, T, S] -> [B, T, H]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=self.n_heads != self.n_kv
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], past: LayerKV | None, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] over past k/v [B, Hkv, S, D] -> (x [B, T, H], fresh k, fresh v)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), rope)
        keys, values = k, v
        if past is not None:
            keys = torch.cat((past.keys, k), dim=2)
            values = torch.cat((past.values, v), dim=2)
        x = x + self.self_attn.attend(q, keys, values, bias)
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


def block_causal_bias(
    positions: Tensor,
    block_length: int | Tensor,
    key_valid: Tensor,
    cache_valid: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """positions [B, T], block_length (int or [B]), key_valid [B, T], cache_valid [B, S] or None
    -> additive bias [B, 1, T, S + T]: 0 where query i may read the key, the dtype's min else.

    Window key j is readable iff valid and block(j) <= block(i), block = position //
    block_length; every valid cache slot is readable (the cache holds only earlier blocks)."""
    b, t = positions.shape
    if isinstance(block_length, Tensor):
        block_length = block_length.view(b, 1)
    block = torch.div(positions, block_length, rounding_mode="floor")
    allowed = (block[:, None, :] <= block[:, :, None]) & key_valid[:, None, :]
    if cache_valid is not None:
        allowed = torch.cat((cache_valid[:, None, :].expand(b, t, -1), allowed), dim=2)
    # A finite fill, not -inf: a pad query with no key to see gets a harmless average instead
    # of NaN, which would reach real rows through 0 * NaN in later layers.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class SDAR(nn.Module):
    """The SDAR (Qwen3) stack, names as in the checkpoint without its `model.` prefix."""

    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int) -> BlockCache:
        """An empty cache of finished blocks for `batch` rows, on this model's device/dtype."""
        w = self.embed_tokens.weight
        shapes = [(self.cfg.num_key_value_heads, self.cfg.head_dim)] * len(self.layers)
        return BlockCache.empty(batch, shapes, device=w.device, dtype=w.dtype)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes of cache one row holds once `tokens` tokens are in it (every layer, K and V)."""
        cfg, itemsize = self.cfg, self.embed_tokens.weight.itemsize
        return len(self.layers) * tokens * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize

    @torch.no_grad()
    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: BlockCache | None = None,
        store: bool = False,
        *,
        block_length: int | Tensor,
        key_valid: Tensor | None = None,
        keep: list[LayerKV] | None = None,
    ) -> Tensor:
        """A window ids [B, T] at absolute positions [B, T] -> final-normed hidden [B, T, H].

        Attention as `block_causal_bias` (cache None or empty: a full block-causal forward).
        `store` appends the window's keys/values to the cache with key_valid (None: all) as
        their validity: the prefill, and the store call of a finished block. `keep` collects
        each layer's fresh [B, Hkv, T, D] for a caller that appends only some rows later."""
        if store and cache is None:
            raise ValueError("store=True needs a cache to store into")
        b, t = ids.shape
        if key_valid is None:
            key_valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        x = self.embed_tokens(ids)
        cache_valid = None if cache is None else cache.valid
        bias = block_causal_bias(positions, block_length, key_valid, cache_valid, x.dtype)
        rope = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            past = None if cache is None else cache.layers[i]
            x, k, v = layer(x, rope, past, bias)
            if keep is not None:
                keep.append(LayerKV(k, v))
            if store:
                cache.extend(i, k, v)  # type: ignore[union-attr]
        if store:
            cache.extend_valid(key_valid)  # type: ignore[union-attr]
        return self.norm(x)

    def project(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """The LM head over hidden [N, H] (gather the rows that need logits first) -> logits
        [N, V], into `out` when given (a caller scoring every step keeps one buffer)."""
        if out is None:
            return self.lm_head(hidden)
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)
