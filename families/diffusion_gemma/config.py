"""DiffusionGemma's architecture and generation defaults, read from the checkpoint's files.

`DiffusionGemmaConfig` comes from `config.json` (the real top-level keys with a `text_config`);
`DiffusionGemmaGenerationConfig` from `generation_config.json` (sampler settings and the stop
ids). Both refuse clearly what the native model cannot run. Knows nothing of weights or requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marble.model.checkpoint_config import (
    GenerationConfig,
    JsonConfig,
    at_least,
    model_type_of,
    need,
)
from marble.model.loader import UnsupportedModelError

SLIDING = "sliding_attention"
FULL = "full_attention"
MODEL_TYPE = "diffusion_gemma"


@dataclass(frozen=True)
class DiffusionGemmaConfig(JsonConfig):
    """Shape of the Gemma 4 text stack shared by the encoder and decoder modes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP and self-conditioning MLP width
    moe_intermediate_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers
    head_dim: int  # sliding layers
    num_global_key_value_heads: int  # full layers
    global_head_dim: int  # full layers
    num_experts: int
    top_k_experts: int
    sliding_window: int
    sliding_rope_theta: float
    full_rope_theta: float
    full_partial_rotary_factor: float
    rms_norm_eps: float
    final_logit_softcapping: float | None
    canvas_length: int
    max_position_embeddings: int
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise UnsupportedModelError(f"unknown layer_types {bad}; known: {SLIDING}, {FULL}")
        for heads, name in (
            (self.num_key_value_heads, "num_key_value_heads"),
            (self.num_global_key_value_heads, "num_global_key_value_heads"),
        ):
            if self.num_attention_heads % heads:
                raise ValueError(f"num_attention_heads is not a multiple of {name} ({heads})")
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ValueError("head dims must be even for rotary embeddings")
        if not 0 < self.top_k_experts <= self.num_experts:
            raise ValueError(f"top_k_experts {self.top_k_experts} not in 1..{self.num_experts}")
        if self.sliding_window < 2 or self.canvas_length < 1:
            raise ValueError("sliding_window must be >= 2 and canvas_length >= 1")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> DiffusionGemmaConfig:
        """The top-level DiffusionGemma `config.json`; raise on what the model cannot run."""
        if model_type_of(raw) != MODEL_TYPE:
            raise UnsupportedModelError(f"model_type {raw.get('model_type')!r} is not {MODEL_TYPE}")
        text = need(raw, "text_config", "config.json")
        where = "config.json text_config"
        if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"hidden_activation {text['hidden_activation']!r}")
        if text.get("attention_bias", False):
            raise UnsupportedModelError("attention_bias=true is not supported")
        # Absent means true (full layers reuse the raw key projection as values).
        if not text.get("attention_k_eq_v", True):
            raise UnsupportedModelError("attention_k_eq_v=false (a full-layer v_proj)")
        if text.get("per_layer_config"):
            raise UnsupportedModelError("per_layer_config is not supported; use the real keys")
        if text.get("attn_logit_softcapping") or text.get("attention_logit_softcapping"):
            raise UnsupportedModelError("attention logit softcapping is not supported")
        tie = raw.get("tie_word_embeddings", True) and text.get("tie_word_embeddings", True)
        if not tie:
            raise UnsupportedModelError("untied embeddings: DiffusionGemma's head is the embedding")
        layer_types = tuple(need(text, "layer_types", where))
        if len(layer_types) != need(text, "num_hidden_layers", where):
            raise UnsupportedModelError("layer_types and num_hidden_layers disagree")
        rope = need(text, "rope_parameters", where)
        sliding_rope, full_rope = rope.get(SLIDING, {}), rope.get(FULL, {})
        if sliding_rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"sliding rope_type {sliding_rope['rope_type']!r}")
        if full_rope.get("rope_type", "default") not in ("default", "proportional"):
            raise UnsupportedModelError(f"full-attention rope_type {full_rope['rope_type']!r}")
        partial = full_rope.get("partial_rotary_factor", 1.0)
        if full_rope.get("rope_type", "default") == "default":
            partial = 1.0
        softcap = text.get("final_logit_softcapping")
        return cls(
            vocab_size=need(text, "vocab_size", where),
            hidden_size=need(text, "hidden_size", where),
            intermediate_size=need(text, "intermediate_size", where),
            moe_intermediate_size=need(text, "moe_intermediate_size", where),
            layer_types=layer_types,
            num_attention_heads=need(text, "num_attention_heads", where),
            num_key_value_heads=need(text, "num_key_value_heads", where),
            head_dim=need(text, "head_dim", where),
            num_global_key_value_heads=text.get("num_global_key_value_heads")
            or need(text, "num_key_value_heads", where),
            global_head_dim=text.get("global_head_dim") or need(text, "head_dim", where),
            num_experts=need(text, "num_experts", where),
            top_k_experts=need(text, "top_k_experts", where),
            sliding_window=need(text, "sliding_window", where),
            sliding_rope_theta=float(sliding_rope.get("rope_theta", 10000.0)),
            full_rope_theta=float(full_rope.get("rope_theta", 10000.0)),
            full_partial_rotary_factor=float(partial),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=None if softcap is None else float(softcap),
            canvas_length=need(raw, "canvas_length", "config.json"),
            max_position_embeddings=text.get("max_position_embeddings", 262144),
            pad_token_id=text.get("pad_token_id"),
            bos_token_id=text.get("bos_token_id"),
            torch_dtype=text.get("dtype") or raw.get("dtype") or raw.get("torch_dtype"),
        )


@dataclass(frozen=True)
class DiffusionGemmaGenerationConfig(GenerationConfig):
    """generate()'s defaults: sampler, stop rule and the ids that end a row."""

    max_denoising_steps: int
    max_new_tokens: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    def __post_init__(self) -> None:
        at_least(
            1, max_denoising_steps=self.max_denoising_steps, max_new_tokens=self.max_new_tokens
        )
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={self.t_min} t_max={self.t_max}")
        at_least(
            0,
            entropy_bound=self.entropy_bound,
            stability_threshold=self.stability_threshold,
            confidence_threshold=self.confidence_threshold,
        )

    @classmethod
    def from_json_dict(
        cls, raw: dict[str, Any], model_raw: dict[str, Any] | None = None
    ) -> DiffusionGemmaGenerationConfig:
        """`generation_config.json`; stop and pad ids fall back to `config.json`'s."""
        model_raw = model_raw or {}
        text = model_raw.get("text_config", {})
        sampler = raw.get("sampler_config") or {}
        kind = sampler.get("_cls_name", "EntropyBoundSamplerConfig")
        if kind != "EntropyBoundSamplerConfig":
            raise UnsupportedModelError(f"sampler_config {kind!r}: only EntropyBoundSamplerConfig")
        eos = raw.get("eos_token_id", model_raw.get("eos_token_id", text.get("eos_token_id")))
        if eos is None:
            raise UnsupportedModelError("no eos_token_id in generation_config.json or config.json")
        pad = raw.get("pad_token_id", text.get("pad_token_id"))
        if pad is None:
            raise UnsupportedModelError("no pad_token_id in generation_config.json or config.json")
        keys = (
            "max_denoising_steps",
            "t_min",
            "t_max",
            "stability_threshold",
            "confidence_threshold",
        )
        missing = [k for k in keys if k not in raw]
        if "entropy_bound" not in sampler:
            missing.append("sampler_config.entropy_bound")
        if missing:
            raise UnsupportedModelError(f"generation_config.json lacks {missing}")
        return cls(
            max_denoising_steps=int(raw["max_denoising_steps"]),
            max_new_tokens=int(raw.get("max_new_tokens", model_raw.get("canvas_length", 1))),
            t_min=float(raw["t_min"]),
            t_max=float(raw["t_max"]),
            entropy_bound=float(sampler["entropy_bound"]),
            stability_threshold=int(raw["stability_threshold"]),
            confidence_threshold=float(raw["confidence_threshold"]),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
            pad_token_id=int(pad),
        )
