"""The bidirectional denoiser: one transformer for LLaDA, Dream and Marble checkpoints.

RoPE, SwiGLU and RMSNorm (`layers.py`), MHA/GQA with optional q/k/v bias, SDPA attention
with a key-padding mask, and position ids so left-padded rows batch correctly. It computes
logits only where asked (`gather`) because a full [B, L, V] tensor is gigabytes for real
vocabularies.

Two kinds of forward: `forward` runs every position (and can hand back each layer's keys and
values, RoPE applied, to serve as a KV cache); `forward_cached` runs only some query positions
against such keys and values, writing the queries' fresh keys and values over theirs first
(Fast-dLLM's prefix and dual cache are the two choices of query range), each part of its rows
over its own store's (`CachedPart`). Knows nothing about
masks-as-tokens, sampling or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble.families.masked.config import ModelConfig
from marble.model.layers import GatedMLP, RMSNorm, apply_rotary, rotary_tables

# One layer's keys (RoPE applied at their positions) and values, [B, Hkv, K, Dh] each.
KeyValues = tuple[Tensor, Tensor]


@dataclass
class CachedPart:
    """Some rows of a cached forward (a slice of its batch) and the keys and values they read,
    one store's: each layer's [n, Hkv, K, Dh], and key_mask [n, K] (True = a key) or None."""

    rows: slice
    layers: list[KeyValues]
    key_mask: Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: Tensor | None,
        cached: list[tuple[slice, KeyValues, Tensor | None]] | None = None,
        slots: Tensor | None = None,
        keep: list[KeyValues] | None = None,
    ) -> Tensor:
        """x [B, Q, D], attn_mask bool [B, 1, 1, K] (True = attend) or None -> [B, Q, D].

        Without `cached` the queries are the keys. With it, per part (rows, (keys, values)
        [n, Hkv, K, Dh], mask [n, 1, 1, K] or None) the rows' fresh keys and values are written
        into the part's at `slots` [B, Q] (in place: a scratch copy) and its queries attend over
        all its K. `keep` collects this layer's keys and values."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if keep is not None:
            keep.append((k, v))
        if cached is None:
            out = self._attend(q, k, v, attn_mask)
        else:
            assert slots is not None
            outs = [self._attend_cached(q, k, v, slots, part) for part in cached]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        gqa = self.n_heads != self.n_kv_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)

    def _attend_cached(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        slots: Tensor,
        part: tuple[slice, KeyValues, Tensor | None],
    ) -> Tensor:
        """A part's queries over its keys and values, the rows' fresh ones written in first."""
        rows, (keys, values), mask = part
        index = slots[rows, None, :, None].expand(-1, self.n_kv_heads, -1, self.head_dim)
        if torch.compiler.is_compiling():
            # Same values, no input mutated: a CUDA graph skips a graph that writes one.
            keys, values = keys.scatter(2, index, k[rows]), values.scatter(2, index, v[rows])
        else:
            keys = keys.scatter_(2, index, k[rows])
            values = values.scatter_(2, index, v[rows])
        return self._attend(q[rows], keys, values, mask)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.mlp_hidden)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: Tensor | None,
        cached: list[tuple[slice, KeyValues, Tensor | None]] | None = None,
        slots: Tensor | None = None,
        keep: list[KeyValues] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask, cached, slots, keep)
        return x + self.mlp(self.mlp_norm(x))


class Denoiser(nn.Module):
    """Bidirectional transformer mapping a (partly masked) canvas to per-position logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh-training init: small embeddings keep the initial loss near log(V)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        for layer in self.layers:
            # Residual branches scaled by depth, as GPT-2 does, so activations stay bounded.
            scale = std / (2 * self.cfg.n_layers) ** 0.5
            nn.init.normal_(layer.attn.o_proj.weight, mean=0.0, std=scale)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=scale)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        gather: Tensor | None = None,
        align: bool = True,
        keep: list[KeyValues] | None = None,
        project: bool = True,
    ) -> Tensor:
        """input_ids [B, L] -> logits [B, L, V], or [B, W, V] at positions `gather` [B, W].

        attention_mask [B, L] (1/True = real token) masks padded keys; position_ids [B, L]
        default to 0..L-1. With `align` (the default) logits[:, i] scores position i for every
        architecture: Dream's next-token-aligned output is shifted right by one here
        (position 0 reuses raw logit 0, as Dream's sampler does). `align=False` returns the raw
        head output. `keep` collects every layer's keys and values, for a KV cache. With
        `project=False` (and `gather`) the result is the final hidden states [B, W, D], for the
        caller to send through `lm_head` only where it needs logits.
        """
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = attention_mask.bool()[:, None, None, :]
        rope = rotary_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(input_ids)
        if attn_mask is not None:
            # A masked key still meets its value in attention's weighted sum (0 * NaN = NaN):
            # padded positions start from zeros, so whatever the pad token's embedding holds
            # cannot reach a real position.
            x = x.masked_fill(~attention_mask.bool()[..., None], 0.0)
        for layer in self.layers:
            x = layer(x, rope, attn_mask, keep=keep)
        x = self.norm(x)
        shift = align and self.cfg.shift_logits
        if gather is not None:
            index = (gather - 1).clamp_min(0) if shift else gather
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            return self.lm_head(x) if project else x
        logits = self.lm_head(x)
        if shift:
            logits = torch.cat((logits[:, :1], logits[:, :-1]), dim=1)
        return logits

    def project(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """The LM head over hidden states [N, D] -> logits [N, V], written into `out` when
        given: a caller that scores every step keeps one buffer, because on CPU a fresh
        vocabulary-sized tensor costs its page faults each time (a fifth of the matmul's time
        at 256 x 126,464)."""
        if out is None:
            return self.lm_head(hidden)
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)

    def forward_cached(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        parts: list[CachedPart],
        slots: Tensor,
        gather: Tensor,
        project: bool = True,
    ) -> Tensor:
        """Queries only: input_ids and position_ids [B, Q] -> raw logits [B, W, V] at query
        rows `gather` [B, W] (no alignment shift: the caller picks the rows), or the hidden
        states there [B, W, D] with `project=False`.

        Each part's rows attend over its keys and values, overwritten in place at `slots`
        [B, Q] (columns of the row's part) by the queries' own."""
        rope = rotary_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        masks = [None if p.key_mask is None else p.key_mask[:, None, None, :] for p in parts]
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            cached = [(p.rows, p.layers[i], mask) for p, mask in zip(parts, masks)]
            x = layer(x, rope, None, cached, slots)
        x = self.norm(x)
        x = x.gather(1, gather[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(x) if project else x
