"""LLaDA2.x's architecture and generation defaults, read from the checkpoint's files.

`LLaDA2Config` comes from `config.json` (the real `llada2_moe` keys; keys the upstream modeling
code never reads are ignored here too). `JointThresholdSettings` are LLaDA2.1 generate()'s
signature defaults and its model card's quality/speed presets, as data a scheduler turns into
serving defaults; `LLaDA2GenerationConfig` adds the stop and pad ids of `generation_config.json`.
Knows nothing of weights or requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from marble.model.checkpoint_config import (
    GenerationConfig,
    JsonConfig,
    at_least,
    model_type_of,
    need,
)
from marble.model.loader import UnsupportedModelError

MODEL_TYPE = "llada2_moe"


@dataclass(frozen=True)
class LLaDA2Config(JsonConfig):
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers' MLP width
    moe_intermediate_size: int  # each expert's width (the shared one: times num_shared_experts)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    first_k_dense_replace: int  # layers below this index have a dense MLP, not experts
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    num_shared_experts: int
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary dims {self.rotary_dim} must be even and in 1..head_dim")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts {self.num_experts} not divisible by n_group")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} not in 1..{self.n_group}")
        # Group scores are each group's top-2 sum, and the chosen experts must fit the groups.
        group = self.num_experts // self.n_group
        if group < 2 or self.num_experts_per_tok > self.topk_group * group:
            raise ValueError("expert groups too small for the top-2 group score or the top-k")

    @property
    def rotary_dim(self) -> int:
        """Leading head dims that rotate (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> LLaDA2Config:
        """The real `config.json`; raise on what the native model cannot run."""
        if model_type_of(raw) != MODEL_TYPE:
            raise UnsupportedModelError(f"model_type {raw.get('model_type')!r} is not {MODEL_TYPE}")
        refused = {
            "hidden_act": ("silu", "only silu experts"),
            "score_function": ("sigmoid", "only the sigmoid router"),
            "tie_word_embeddings": (False, "tied embeddings (LLaDA2's lm_head is its own)"),
            "use_qkv_bias": (False, "a query_key_value bias"),
            "use_bias": (False, "linear biases"),
            "use_qk_norm": (True, "no q/k norms"),
            "rope_scaling": (None, "rope_scaling"),
        }
        for key, (supported, what) in refused.items():
            if raw.get(key, supported) != supported:
                raise UnsupportedModelError(f"{key}={raw[key]!r}: {what} is not supported")
        heads = need(raw, "num_attention_heads")
        hidden = need(raw, "hidden_size")
        return cls(
            vocab_size=need(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=need(raw, "intermediate_size"),
            moe_intermediate_size=need(raw, "moe_intermediate_size"),
            num_hidden_layers=need(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or hidden // heads,
            partial_rotary_factor=float(raw.get("partial_rotary_factor", 1.0)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
            num_experts=need(raw, "num_experts"),
            num_experts_per_tok=need(raw, "num_experts_per_tok"),
            n_group=int(raw.get("n_group", 1)),
            topk_group=int(raw.get("topk_group", 1)),
            num_shared_experts=int(raw.get("num_shared_experts", 0)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=need(raw, "max_position_embeddings"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


@dataclass(frozen=True)
class JointThresholdSettings:
    """LLaDA2.1's joint unmask/edit rule per block: unmask above `threshold` (at least
    `num_to_transfer` a step), replace a filled token above `editing_threshold`, then up to
    `max_post_steps` mask-free forwards while edits keep coming."""

    threshold: float = 0.95
    editing_threshold: float = 0.9
    max_post_steps: int = 16
    block_length: int = 32
    num_to_transfer: int = 1
    eos_early_stop: bool = False  # the signature's; the model card's examples pass True
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        # Above 1 no probability passes: editing off, as LLaDA2.0-style threshold decoding.
        at_least(
            0,
            editing_threshold=self.editing_threshold,
            max_post_steps=self.max_post_steps,
            temperature=self.temperature,
        )
        at_least(1, block_length=self.block_length, num_to_transfer=self.num_to_transfer)


# generate()'s signature defaults, and the model card's quality (Q) and speed (S) modes.
DEFAULT = JointThresholdSettings()
PRESETS: dict[str, JointThresholdSettings] = {
    "default": DEFAULT,
    "quality": replace(DEFAULT, threshold=0.7, editing_threshold=0.5),
    "speed": replace(DEFAULT, threshold=0.5, editing_threshold=0.0),
}


@dataclass(frozen=True)
class LLaDA2GenerationConfig(GenerationConfig):
    """What `generation_config.json` adds to the rule's defaults: the stop and pad ids."""

    eos_token_id: int
    pad_token_id: int

    @classmethod
    def from_json_dict(
        cls, raw: dict[str, Any], model_raw: dict[str, Any] | None = None
    ) -> LLaDA2GenerationConfig:
        """`generation_config.json`; ids missing there fall back to `config.json`'s."""
        model_raw = model_raw or {}
        eos = raw.get("eos_token_id", model_raw.get("eos_token_id"))
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        pad = raw.get("pad_token_id", model_raw.get("pad_token_id", eos))
        if eos is None:
            raise UnsupportedModelError("no eos_token_id in generation_config.json or config.json")
        return cls(eos_token_id=int(eos), pad_token_id=int(pad))
