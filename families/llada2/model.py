"""LLaDA2.x's MoE denoiser: block-causal attention over a cache of finished blocks.

One forward runs a window of tokens per row (some full blocks to encode, and/or the current
block) against a `BlockCache` of earlier blocks: every query sees the cache's valid slots and,
inside the window, the keys of its own and earlier blocks (strict block-causal, what LLaDA2 is
trained with). The layers are RMSNorm, a fused query_key_value with per-head q/k norms before
partial rotate-half RoPE, GQA, dense first layers, then sigmoid-routed group-limited top-k
experts beside a shared expert. Logits only where the caller asks (`project`). Knows nothing of
sampling, tokenizers or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marble.families.llada2.config import LLaDA2Config
from marble.model.block_causal import BlockAttention, BlockCausalStack, PreNormLayer
from marble.model.experts import ListedExperts
from marble.model.layers import GatedMLP, RMSNorm, apply_rotary


class Attention(BlockAttention):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.rotary_dim = cfg.rotary_dim
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, width, bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _rotate(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """RoPE on the leading `rotary_dim` dims of x [B, h, T, D]; the rest pass through."""
        r = self.rotary_dim
        return torch.cat((apply_rotary(x[..., :r], *rope), x[..., r:]), dim=-1)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, H] -> q [B, Hq, T, D], k and v [B, Hkv, T, D]; q/k normed, then rotated."""
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split((self.n_heads, self.n_kv, self.n_kv), dim=1)
        q = self._rotate(self.query_layernorm(q), rope)
        k = self._rotate(self.key_layernorm(k), rope)
        return q, k, v

    def output(self, out: Tensor) -> Tensor:
        b, _, t, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class Router(nn.Module):
    """Sigmoid scores; `expert_bias` steers which experts are chosen, not their weights."""

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
        )
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, H] -> (weights [N, k] float32, experts [N, k]) in descending selection order."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E], router in fp32
        choice = scores + self.expert_bias.float()
        n, e = choice.shape
        grouped = choice.view(n, self.n_group, e // self.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scaling
        return weights, experts


class MoE(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.gate = Router(cfg)
        self.experts = ListedExperts(cfg.num_experts, h, cfg.moe_intermediate_size)
        self.shared_experts = (
            GatedMLP(h, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, H] -> the routed experts' weighted sum plus the shared expert [B, T, H]."""
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(flat)
        out = self.experts(flat, weights, experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class DecoderLayer(PreNormLayer):
    def __init__(self, cfg: LLaDA2Config, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            MoE(cfg) if cfg.is_moe(index) else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def attn(self) -> nn.Module:
        return self.attention


class LLaDA2(BlockCausalStack):
    """The LLaDA2.x MoE stack (names as in the checkpoint, without its `model.` prefix)."""

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta

    def embed(self, ids: Tensor) -> Tensor:
        return self.word_embeddings(ids)
