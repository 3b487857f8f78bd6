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

from torch import Tensor, nn

from marble.families.sdar.config import SDARConfig
from marble.model.block_causal import BlockAttention, BlockCausalStack, PreNormLayer
from marble.model.layers import GatedMLP, RMSNorm, apply_rotary


class Attention(BlockAttention):
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

    def output(self, out: Tensor) -> Tensor:
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(PreNormLayer):
    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def attn(self) -> nn.Module:
        return self.self_attn


class SDAR(BlockCausalStack):
    """The SDAR (Qwen3) stack, names as in the checkpoint without its `model.` prefix."""

    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)
