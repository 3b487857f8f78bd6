"""The block-causal stack two families share (LLaDA2, SDAR): a window of tokens per row at
absolute positions, attending to a `BlockCache` of finished blocks and, inside the window, to
the valid keys of its own and earlier blocks (bidirectional inside a block, causal across).

`BlockCausalStack` drives the layers, the cache writes and the LM head; a family's model
subclasses it with its own embedding, decoder layers and RoPE width. Knows nothing of
sampling, tokenizers or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble.model.block_cache import BlockCache, LayerKV
from marble.model.cascade import CascadeLayer, SharedKeys
from marble.model.kv_slots import SlotGroups, SlotGroupsLayer
from marble.model.layers import rotary_tables


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


def slot_bias(
    positions: Tensor,
    block_length: Tensor,
    end: Tensor,
    read: int,
    dtype: torch.dtype,
    start: Tensor | None = None,
) -> Tensor:
    """`block_causal_bias` over slots whose columns 0..read-1 hold absolute positions from
    `start` [B] on (None: 0), cache then window (positions [B, T], block_length [B], end [B]
    each row's readable columns) -> additive bias [B, 1, T, read]."""
    b, _ = positions.shape
    size = block_length.view(b, 1)
    columns = torch.arange(read, device=positions.device)
    keys = columns[None, :] if start is None else start[:, None] + columns
    query_block = torch.div(positions, size, rounding_mode="floor")  # [B, T]
    key_block = torch.div(keys, size, rounding_mode="floor")  # [B, S]
    allowed = (key_block[:, None, :] <= query_block[:, :, None]) & (
        columns[None, None, :] < end[:, None, None]
    )
    bias = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class BlockAttention(nn.Module):
    """A block-causal layer's softmax attention: subclasses build their projections under
    their checkpoint's names, set `n_heads` and `n_kv`, and define `project` and `output`
    (heads joined and projected), which attention over keys in several places shares
    (`model/cascade.py`)."""

    n_heads: int
    n_kv: int
    scale = None  # of the scores: head_dim ** -0.5

    def output(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, S, D], additive bias [B, 1, T, S] -> [B, T, H]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=self.n_heads != self.n_kv
        )
        return self.output(out)


class PreNormLayer(nn.Module):
    """A pre-norm layer over the cache: x + attention(norm(x)), then + mlp(norm(x)). Subclasses
    build `input_layernorm`, `post_attention_layernorm` and `mlp` under their checkpoint's
    names, and return their attention module (`project`, `attend`) from `attn`."""

    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def attn(self) -> nn.Module:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        past: LayerKV | SlotGroupsLayer | CascadeLayer | None,
        bias: Tensor | list[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] over past k/v [B, Hkv, S, D] -> (x [B, T, H], fresh k, fresh v); over
        slots, `bias` is one per store's part of the rows."""
        attention = self.attn()
        q, k, v = attention.project(self.input_layernorm(x), rope)
        if past is None:
            out = attention.attend(q, k, v, bias)
        else:
            out = past.attend(attention, q, k, v, bias)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class BlockCausalStack(nn.Module):
    """Subclasses build `layers` (each `layer(x, rope, past, bias) -> (x, k, v)`), `norm` and
    `lm_head`, and define `embed`, `kv_heads`, `head_dim`, `rotary_dim` and `rope_theta`."""

    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear
    kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float

    def embed(self, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int) -> BlockCache:
        """An empty cache of finished blocks for `batch` rows, on this model's device/dtype."""
        w = self.lm_head.weight
        shapes = [(self.kv_heads, self.head_dim)] * len(self.layers)
        return BlockCache.empty(batch, shapes, device=w.device, dtype=w.dtype)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes of cache one row holds once `tokens` tokens are in it (every layer, K and V)."""
        itemsize = self.lm_head.weight.itemsize
        return len(self.layers) * tokens * 2 * self.kv_heads * self.head_dim * itemsize

    @torch.no_grad()
    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: BlockCache | None = None,
        write: bool = False,
        *,
        block_length: int | Tensor,
        key_valid: Tensor | None = None,
        keep: list[LayerKV] | None = None,
    ) -> Tensor:
        """A window ids [B, T] at absolute positions [B, T] -> final-normed hidden [B, T, H].

        Attention as `block_causal_bias`, key_valid (None: all) marking the window's real keys.
        `write` appends the window's keys/values to the cache, key_valid as their validity (a
        prefill, or a finished block's store); `keep` collects each layer's [B, Hkv, T, D] for
        a caller that appends only part of the window, or appends it later."""
        if write and cache is None:
            raise ValueError("write=True needs a cache to write to")
        b, t = ids.shape
        if key_valid is None:
            key_valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        x = self.embed(ids)
        cache_valid = None if cache is None else cache.valid
        bias = block_causal_bias(positions, block_length, key_valid, cache_valid, x.dtype)
        rope = rotary_tables(positions, self.rotary_dim, self.rope_theta)
        for i, layer in enumerate(self.layers):
            past = None if cache is None else cache.layers[i]
            x, k, v = layer(x, rope, past, bias)
            if keep is not None:
                keep.append(LayerKV(k, v))
            if write:
                cache.extend(i, k, v)  # type: ignore[union-attr]
        if write:
            cache.extend_valid(key_valid)  # type: ignore[union-attr]
        return self.norm(x)

    @torch.no_grad()
    def forward_slots(
        self,
        ids: Tensor,
        positions: Tensor,
        slots: SlotGroups,
        block_length: Tensor,
        start: Tensor | None = None,
        shared: list[SharedKeys] | None = None,
    ) -> Tensor:
        """`forward` for windows kept in slot stores: each row's window [B, T] (positions
        following its cache; rows in `slots.order`) is written into its slot, attention reads
        the slots in place, store by store -> final-normed hidden [B, T, H]. A row's slot
        holds its positions from `start` [B] on (None: 0), what comes before in `shared`
        (finished prompt blocks, read in place beside the slots). The caller advances a
        row's length over what is final."""
        x = self.embed(ids)
        biases = [
            slot_bias(
                positions[rows],
                block_length[rows],
                batch.end,
                batch.read,
                x.dtype,
                None if start is None else start[rows],
            )
            for rows, batch in slots.parts
        ]
        rope = rotary_tables(positions, self.rotary_dim, self.rope_theta)
        for i, layer in enumerate(self.layers):
            past = CascadeLayer(slots, shared, i) if shared else slots.layer(i)
            x, _, _ = layer(x, rope, past, biases)
        return self.norm(x)

    def project(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """The LM head over hidden [N, H] (gather the rows that need logits first) -> logits
        [N, V], into `out` when given (a caller scoring every step keeps one buffer)."""
        if out is None:
            return self.lm_head(hidden)
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)
