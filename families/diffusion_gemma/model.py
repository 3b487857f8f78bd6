"""DiffusionGemma's text model: one Gemma 4 weight stack run in two modes.

`encode` is causal (sliding layers windowed) and writes the KV cache for the prompt or a
finished canvas; `decode` runs a canvas bidirectionally over [cache ; canvas], reads the cache
without writing it, and returns softcapped logits. Self-conditioning feeds the previous step's
distribution back into the decoder input. Knows nothing of sampling, tokenizers or requests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble.families.diffusion_gemma.config import SLIDING, DiffusionGemmaConfig
from marble.model.block_cache import BlockCache, LayerKV
from marble.model.cascade import CascadeLayer, SharedKeys, additive
from marble.model.experts import GroupedExperts
from marble.model.kv_slots import SlotGroups, SlotGroupsLayer
from marble.model.layers import GatedMLP, apply_rotary


class RMSNorm(nn.Module):
    """x * (mean(x^2) + eps)^-1/2, times the weight as stored (not 1 + weight) if it has one."""

    def __init__(self, dim: int, eps: float, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D], statistics in float32."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            xf = xf * self.weight.float()
        return xf.to(x.dtype)


def rotary_tables(
    positions: Tensor, head_dim: int, theta: float, partial: float
) -> tuple[Tensor, Tensor]:
    """positions [B, T] -> (cos, sin) [B, 1, T, head_dim] float32.

    Only the first floor(partial * head_dim / 2) frequencies rotate ("proportional" RoPE);
    the exponent is still divided by the whole head_dim. The rest get frequency 0."""
    half = head_dim // 2
    rotated = int(partial * head_dim / 2)
    exponent = torch.arange(0, 2 * rotated, 2, device=positions.device).float() / head_dim
    inv_freq = torch.zeros(half, device=positions.device)
    inv_freq[:rotated] = 1.0 / theta**exponent
    freqs = positions.float()[..., None] * inv_freq  # [B, T, half]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class SelfConditioning(GatedMLP):
    """The previous step's expected embedding, pre-normed, through a gated MLP."""

    def __init__(self, hidden: int, inner: int, eps: float) -> None:
        super().__init__(hidden, inner, gelu_tanh)
        self.pre_norm = RMSNorm(hidden, eps)

    def forward(self, s: Tensor) -> Tensor:
        """[B, L, H] -> [B, L, H]; exactly 0 for s = 0."""
        return super().forward(self.pre_norm(s))


class Attention(nn.Module):
    """q/k norms, weightless v norm, attention scale 1; full layers use k_proj as values."""

    def __init__(self, cfg: DiffusionGemmaConfig, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads if sliding else cfg.num_global_key_value_heads
        self.head_dim = cfg.head_dim if sliding else cfg.global_head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False) if sliding else None
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_weight=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] -> q [B, Hq, T, D], k and v [B, Hkv, T, D] (RoPE on q and k)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        raw_k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x)
        raw_v = raw_v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(raw_k), cos, sin)
        return q, k, self.v_norm(raw_v)

    scale = 1.0  # of the scores (q and k are normed)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, S, D], allowed bool [B, 1, T, S] -> [B, T, H]."""
        # A finite fill, not -inf: a pad query that sees no key gets a harmless average
        # instead of NaN, which would reach real rows through 0 * NaN in later layers.
        bias = additive(allowed, q.dtype)
        # Query heads share their KV head in the kernel: repeating k/v would copy every key.
        gqa = self.n_heads != self.n_kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=gqa
        )
        return self.output(out)

    def output(self, out: Tensor) -> Tensor:
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Router(nn.Module):
    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, H] -> (weights [N, k], experts [N, k]); top-k renormalised, then scaled."""
        xf = x.float()
        r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        r = (r * self.root * self.scale.float()).to(x.dtype)
        probs = self.proj(r).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale.float()[experts], experts


class DecoderLayer(nn.Module):
    """Attention, then a dense MLP beside top-k experts, then the mode's layer scalar."""

    def __init__(self, cfg: DiffusionGemmaConfig, layer_type: str) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = layer_type == SLIDING
        self.self_attn = Attention(cfg, self.sliding)
        self.mlp = GatedMLP(h, cfg.intermediate_size, gelu_tanh)
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, h, cfg.moe_intermediate_size, gelu_tanh)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            self.add_module(name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder mode
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder mode

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        past: LayerKV | SlotGroupsLayer,
        allowed: Tensor | list[Tensor],
        encoder: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] over past k/v [B, Hkv, S, D] -> (x [B, T, H], fresh k, fresh v); over
        slots, `allowed` is one per store's part of the rows."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), *rope)
        out = past.attend(self.self_attn, q, k, v, allowed)
        x = x + self.post_attention_layernorm(out)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts)
        moe = self.post_feedforward_layernorm_2(moe.view_as(x))
        scalar = self.encoder_layer_scalar if encoder else self.layer_scalar
        return (x + self.post_feedforward_layernorm(dense + moe)) * scalar, k, v


class DiffusionGemma(nn.Module):
    """The text stack; `encode` writes a `BlockCache`, `decode` only reads it."""

    def __init__(self, cfg: DiffusionGemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(h, cfg.intermediate_size, cfg.rms_norm_eps)
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, with_weight=False)

    def new_cache(self, batch: int) -> BlockCache:
        """An empty encoder cache for `batch` rows on this model's device and dtype."""
        shapes = [(layer.self_attn.n_kv, layer.self_attn.head_dim) for layer in self.layers]
        sliding = tuple(layer.sliding for layer in self.layers)
        w = self.embed_tokens.weight
        return BlockCache.empty(batch, shapes, sliding, self.cfg.sliding_window, w.device, w.dtype)

    def cache_bytes(self, tokens: int) -> int:
        """Bytes of KV cache one row holds once `tokens` tokens are encoded: full layers keep
        every token, sliding layers the last window - 1."""
        itemsize = self.embed_tokens.weight.itemsize
        total = 0
        for layer in self.layers:
            kept = min(tokens, self.cfg.sliding_window - 1) if layer.sliding else tokens
            total += 2 * kept * layer.self_attn.n_kv * layer.self_attn.head_dim * itemsize
        return total

    def _scale(self, x: Tensor) -> Tensor:
        """Embeddings times sqrt(hidden), the factor rounded to their dtype first."""
        return x * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)

    def _embed(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> E[ids] * sqrt(hidden) [B, T, H]."""
        return self._scale(self.embed_tokens(ids))

    def _ropes(self, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
        cfg = self.cfg
        return {
            True: rotary_tables(positions, cfg.head_dim, cfg.sliding_rope_theta, 1.0),
            False: rotary_tables(
                positions,
                cfg.global_head_dim,
                cfg.full_rope_theta,
                cfg.full_partial_rotary_factor,
            ),
        }

    def head(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden [B, T, H] -> softcapped logits [B, T, V] (float32)."""
        logits = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.cfg.final_logit_softcapping
        # In place: each vocabulary-sized temporary costs its page faults on CPU.
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)

    @torch.no_grad()
    def encode(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: BlockCache,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Causal pass over ids [B, T] at positions [B, T]; appends to cache; -> hidden [B, T, H].

        valid [B, T] (False = left pad) hides those tokens as keys, now and later. Masks follow
        slot order (rows right-aligned); positions only feed RoPE, so pads may be counted."""
        b, t = ids.shape
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        start = cache.length
        query = torch.arange(start, start + t, device=ids.device)  # absolute slots
        ropes = self._ropes(positions)
        x = self._embed(ids)
        for i, layer in enumerate(self.layers):
            stored = cache.stored(i)
            key = torch.arange(start - stored, start + t, device=ids.device)
            allowed = key[None, :] <= query[:, None]  # [T, S + T]
            if layer.sliding:
                allowed &= key[None, :] > query[:, None] - self.cfg.sliding_window
            key_valid = torch.cat((cache.layer_valid(i), valid.bool()), dim=1)  # [B, S + T]
            allowed = allowed[None, None] & key_valid[:, None, None, :]
            x, k, v = layer(x, ropes[layer.sliding], cache.layers[i], allowed, True)
            cache.extend(i, k, v)
        cache.extend_valid(valid)
        return self.norm(x)

    @torch.no_grad()
    def decode(
        self,
        canvas: Tensor,
        positions: Tensor,
        cache: BlockCache | dict[bool, SlotGroups],
        self_cond_logits: Tensor | None = None,
        self_cond_mask: Tensor | None = None,
        hidden_states: list[Tensor] | None = None,
        shared: dict[bool, list[SharedKeys]] | None = None,
    ) -> Tensor:
        """Bidirectional pass of canvas [B, L] at positions [B, L] over the cache -> [B, L, V].

        self_cond_logits [B, L, V] are the previous step's logits (None: first step);
        self_cond_mask [B] False turns it off per row. The cache is read, never written (slots,
        `cache[sliding]` per layer kind, take the canvas's keys as scratch past each row's end;
        `shared[sliding]` the prompt pages before the slots, read in place, `shared_keys`).
        `hidden_states`, if given, collects the input, each layer's output and the final norm."""
        b, length = canvas.shape
        e = self._embed(canvas)
        if self_cond_logits is not None:
            w = self.embed_tokens.weight
            probs = self_cond_logits.float().softmax(-1).to(w.dtype)
            s = self._scale(probs @ w)  # the expected embedding [B, L, H]
            if self_cond_mask is not None:
                s = s * self_cond_mask.to(s.dtype)[:, None, None]
            e = e + self.self_conditioning(s)
        x = self.input_norm(e)
        if hidden_states is not None:
            hidden_states.append(x)
        ropes = self._ropes(positions)
        keys = self._decode_keys(cache, b, length, shared)
        for i, (layer, (past, allowed)) in enumerate(zip(self.layers, keys)):
            x, _, _ = layer(x, ropes[layer.sliding], past, allowed, False)
            if hidden_states is not None and i < len(self.layers) - 1:
                hidden_states.append(x)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.head(x)

    def _decode_keys(
        self,
        cache: BlockCache | dict[bool, SlotGroups],
        b: int,
        length: int,
        shared: dict[bool, list[SharedKeys]] | None,
    ) -> list[tuple[LayerKV | SlotGroupsLayer | CascadeLayer, Tensor | list[Tensor]]]:
        """Per layer, what a canvas [B, L] attends over: the past and which keys it may read
        (bool [B, 1, L, S + L]): every cached key a layer keeps (a sliding layer the last
        window - 1) and the whole canvas."""
        if isinstance(cache, BlockCache):
            canvas_valid = torch.ones(b, length, dtype=torch.bool, device=cache.valid.device)
            out = []
            for i, kv in enumerate(cache.layers):
                key_valid = torch.cat((cache.layer_valid(i), canvas_valid), dim=1)
                out.append((kv, key_valid[:, None, None, :].expand(b, 1, length, -1)))
            return out
        masks: dict[bool, list[Tensor]] = {}
        for sliding, groups in cache.items():
            masks[sliding] = []
            for _, slots in groups.parts:
                key = torch.arange(slots.read, device=slots.end.device)[None, :]
                allowed = key < slots.end[:, None]  # the cache, then the canvas
                if sliding:
                    allowed &= key >= slots.end[:, None] - length - (self.cfg.sliding_window - 1)
                rows = len(slots.index)
                masks[sliding].append(allowed[:, None, None, :].expand(rows, 1, length, -1))
        layers = self._slot_layers(cache, shared)
        return [(past, masks[layer.sliding]) for layer, past in layers]

    def _slot_layers(
        self, slots: dict[bool, SlotGroups], shared: dict[bool, list[SharedKeys]] | None
    ) -> list[tuple[DecoderLayer, SlotGroupsLayer | CascadeLayer]]:
        """Each layer with its layer in the store of its kind (and the shared keys of it)."""
        seen = {True: 0, False: 0}
        out: list[tuple[DecoderLayer, SlotGroupsLayer | CascadeLayer]] = []
        for layer in self.layers:
            kind, index = layer.sliding, seen[layer.sliding]
            if shared and shared[kind]:
                out.append((layer, CascadeLayer(slots[kind], shared[kind], index)))
            else:
                out.append((layer, slots[kind].layer(index)))
            seen[kind] += 1
        return out

    def shared_mask(self, queries: Tensor, start: int, length: int, encoder: bool) -> Tensor:
        """Which keys of a shared run at absolute positions [start, start + length) the
        sliding layers' queries at positions `queries` [G, T] read: bool [G, T, length]. The
        encoder's causal query reads the last `sliding_window` positions through its own; a
        canvas (which follows its row's cache) reads the cache's last `sliding_window - 1`,
        whatever the query. Full layers read the whole run."""
        key = torch.arange(start, start + length, device=queries.device)[None, None, :]
        if encoder:
            return key > queries[:, :, None] - self.cfg.sliding_window
        first = queries[:, :1, None] - (self.cfg.sliding_window - 1)
        return (key >= first).expand(-1, queries.shape[1], -1)

    @torch.no_grad()
    def encode_slots(
        self,
        ids: Tensor,
        positions: Tensor,
        slots: dict[bool, SlotGroups],
        start: Tensor | None = None,
        shared: dict[bool, list[SharedKeys]] | None = None,
    ) -> Tensor:
        """`encode` into slots (`cache[sliding]` per layer kind) whose columns hold absolute
        positions from `start` [B] on (None: 0), in order: ids [B, T] at positions [B, T] that
        follow each row's cache are written after it, reading `shared[sliding]` (the prompt
        pages before the slots) in place -> hidden [B, T, H]. The caller advances the rows'
        lengths."""
        ropes = self._ropes(positions)
        x = self._embed(ids)
        masks: dict[bool, list[Tensor]] = {}
        for sliding, groups in slots.items():
            masks[sliding] = []
            for rows, batch in groups.parts:
                query = positions[rows][:, :, None]
                column = torch.arange(batch.read, device=ids.device)[None, None, :]
                key = column if start is None else column + start[rows][:, None, None]
                allowed = (key <= query) & (column < batch.end[:, None, None])
                if sliding:
                    allowed &= key > query - self.cfg.sliding_window
                masks[sliding].append(allowed[:, None])
        for layer, past in self._slot_layers(slots, shared):
            x, _, _ = layer(x, ropes[layer.sliding], past, masks[layer.sliding], True)
        return self.norm(x)
