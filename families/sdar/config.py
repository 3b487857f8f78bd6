"""SDAR's architecture, generation defaults and decoding settings, read from the checkpoint.

`SDARConfig` comes from `config.json` (the real `sdar` keys; training-only keys are ignored, as
the upstream inference path ignores them), `SDARGenerationConfig` from `generation_config.json`
(stop ids and sampling defaults), and `SDARDecodeSettings` are block_diffusion_generate()'s
knobs, validated. Knows nothing of weights, tensors or requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from marble.model.checkpoint_config import (
    GenerationConfig,
    JsonConfig,
    check_sampler,
    model_type_of,
    need,
)
from marble.model.loader import UnsupportedModelError

MODEL_TYPE = "sdar"


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class SDARConfig(JsonConfig):
    """Qwen3 dense shapes; `block_size` is the training block, a default for decoding only."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    block_size: int = 4
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "block_size",
        ):
            _positive_int(name, getattr(self, name))
        _positive_real("rope_theta", self.rope_theta)
        _positive_real("rms_norm_eps", self.rms_norm_eps)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotate-half RoPE")
        for name in ("mask_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (0..{self.vocab_size})")

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> SDARConfig:
        """The real `config.json`; raise on what the native model cannot run."""
        if model_type_of(raw) != MODEL_TYPE:
            raise UnsupportedModelError(f"model_type {raw.get('model_type')!r} is not {MODEL_TYPE}")
        refused = {
            "hidden_act": ("silu", "only silu MLPs"),
            "attention_bias": (False, "q/k/v/o biases"),
            "rope_scaling": (None, "rope_scaling"),
            "use_sliding_window": (False, "sliding-window attention"),
        }
        for key, (supported, what) in refused.items():
            if raw.get(key, supported) != supported:
                raise UnsupportedModelError(f"{key}={raw[key]!r}: {what} is not supported")
        moe = [
            k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if k in raw
        ]
        if moe:
            raise UnsupportedModelError(
                f"SDAR mixture-of-experts checkpoints are not supported {moe}"
            )
        heads = need(raw, "num_attention_heads")
        hidden = need(raw, "hidden_size")
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=need(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=need(raw, "intermediate_size"),
            num_hidden_layers=need(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=need(raw, "max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            mask_token_id=raw.get("mask_token_id"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
            block_size=raw.get("block_size", 4),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


@dataclass(frozen=True)
class SDARGenerationConfig(GenerationConfig):
    """`generation_config.json`: the ids that end an answer and the sampling defaults."""

    stop_ids: tuple[int, ...]
    pad_token_id: int | None
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float

    def __post_init__(self) -> None:
        if not self.stop_ids:
            raise ValueError("no stop ids (eos_token_id)")
        check_sampler(self.temperature, self.top_k, self.top_p)

    @classmethod
    def from_json_dict(
        cls, raw: dict[str, Any], model_raw: dict[str, Any] | None = None
    ) -> SDARGenerationConfig:
        """`generation_config.json`; stop ids missing there fall back to `config.json`'s."""
        model_raw = model_raw or {}
        eos = raw.get("eos_token_id", model_raw.get("eos_token_id"))
        if eos is None:
            raise UnsupportedModelError("no eos_token_id in generation_config.json or config.json")
        stops = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        return cls(
            stop_ids=stops,
            pad_token_id=raw.get("pad_token_id", model_raw.get("pad_token_id")),
            do_sample=bool(raw.get("do_sample", False)),
            temperature=float(raw.get("temperature", 1.0)),
            top_k=int(raw.get("top_k", 0)),
            top_p=float(raw.get("top_p", 1.0)),
        )


class Remasking(IntEnum):
    """Which masked positions a denoising step commits (generate.py's remasking_strategy)."""

    STATIC = 0  # low_confidence_static: the k most confident
    DYNAMIC = 1  # low_confidence_dynamic: all above the threshold if >= k of them, else top-k
    SEQUENTIAL = 2  # sequential: the k positions from the first mask on

    @classmethod
    def from_name(cls, name: str) -> Remasking:
        """generate.py's strategy names; entropy_bounded crashes upstream and is refused."""
        names = {
            "low_confidence_static": cls.STATIC,
            "low_confidence_dynamic": cls.DYNAMIC,
            "sequential": cls.SEQUENTIAL,
        }
        if name not in names:
            raise ValueError(f"remasking {name!r} is not one of {sorted(names)}")
        return names[name]


@dataclass(frozen=True)
class SDARDecodeSettings:
    """block_diffusion_generate()'s knobs for one request. Defaults: the checkpoints' training
    block (4), one token per step (steps = block), and LMDeploy/JetEngine's dynamic rule at
    0.9; temperature 0 is Marble's greedy mode (upstream has none)."""

    block_length: int = 4
    steps: int = 4
    remasking: Remasking = Remasking.DYNAMIC
    confidence_threshold: float = 0.9
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _positive_int("block_length", self.block_length)
        _positive_int("steps", self.steps)
        if not isinstance(self.remasking, Remasking):
            raise ValueError(f"remasking must be a Remasking, got {self.remasking!r}")
        # Strictly greater passes, so 1 commits by top-k only and 0 everything above zero.
        if not 0 <= self.confidence_threshold <= 1:
            raise ValueError(
                f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}"
            )
        check_sampler(self.temperature, self.top_k, self.top_p)
