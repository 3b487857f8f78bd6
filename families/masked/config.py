"""The full-attention masked family's config: LLaDA, Dream and Marble's own denoisers.

Reads a checkpoint's `config.json` (LLaDA keys, Dream/Qwen2 keys, or Marble's own) into
`ModelConfig`, and refuses clearly what `Denoiser` (model.py) cannot run. Knows nothing of weights,
tokenizers or requests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from marble.model.checkpoint_config import JsonConfig
from marble.model.loader import UnsupportedModelError


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """Shape and conventions of a bidirectional denoiser; special ids come from the checkpoint."""

    arch: str  # "llada", "dream" or "marble": selects the tensor-name map and logit alignment
    vocab_size: int  # embedding rows (may exceed the tokenizer length)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    # Dream keeps next-token alignment: raw[:, i] scores position i + 1, so the sampler shifts.
    shift_logits: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_json_dict(self) -> dict[str, Any]:
        """Marble's own `config.json` content (model_type "marble")."""
        return {"model_type": "marble", **dataclasses.asdict(self)}

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Dispatch on the checkpoint's keys; MoE and other unsupported variants raise."""
        model_type = str(raw.get("model_type", "")).lower()
        architectures = raw.get("architectures") or []
        moe_keys = [k for k in ("num_experts", "num_local_experts", "moe_layer_freq") if k in raw]
        if moe_keys or any("moe" in a.lower() for a in architectures):
            raise UnsupportedModelError(
                f"no model family serves this mixture-of-experts checkpoint "
                f"(architectures={architectures}, MoE keys {moe_keys}): the full-attention "
                "family serves dense LLaDA, Dream and Marble checkpoints, LLaDA2's family "
                "its own MoE"
            )
        if model_type == "marble":
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(raw) - fields - {"model_type"})
            if unknown:
                raise UnsupportedModelError(f"unknown keys in Marble config.json: {unknown}")
            return cls(**{k: v for k, v in raw.items() if k in fields})
        if model_type == "llada":
            return _from_llada(raw)
        if model_type == "dream":
            return _from_dream(raw)
        raise UnsupportedModelError(
            f"unsupported model_type {raw.get('model_type')!r} (architectures={architectures}); "
            "supported: llada, Dream, marble"
        )


def _require(raw: dict[str, Any], flag: str, expected: Any, what: str) -> None:
    if flag in raw and raw[flag] != expected:
        raise UnsupportedModelError(f"{what}: config.json has {flag}={raw[flag]!r}")


def _from_llada(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "block_type", "llama", "only LLaDA's llama block is supported")
    _require(raw, "alibi", False, "ALiBi attention is not supported")
    _require(raw, "rope", True, "LLaDA without rotary embeddings is not supported")
    _require(raw, "layer_norm_type", "rms", "only RMSNorm is supported")
    _require(raw, "include_bias", False, "linear biases are not supported for LLaDA")
    _require(raw, "attention_layer_norm", False, "q/k layer norm is not supported")
    _require(raw, "input_emb_norm", False, "input embedding norm is not supported")
    _require(raw, "scale_logits", False, "logit scaling is not supported")
    _require(raw, "activation_type", "silu", "only the SwiGLU (silu) MLP is supported")
    n_heads = raw["n_heads"]
    return ModelConfig(
        arch="llada",
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        d_model=raw["d_model"],
        n_layers=raw["n_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("n_kv_heads") or n_heads,
        mlp_hidden=raw["mlp_hidden_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(raw.get("include_qkv_bias", False)),
        shift_logits=False,
        tie_embeddings=bool(raw.get("weight_tying", False)),
        max_seq_len=raw.get("max_sequence_length", 4096),
        mask_token_id=raw.get("mask_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("torch_dtype"),
    )


def _from_dream(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "hidden_act", "silu", "only the SwiGLU (silu) MLP is supported")
    _require(raw, "use_sliding_window", False, "sliding-window attention is not supported")
    _require(raw, "use_mrope", False, "multimodal RoPE is not supported")
    if raw.get("rope_scaling"):
        raise UnsupportedModelError(f"rope_scaling {raw['rope_scaling']!r} is not supported")
    n_heads = raw["num_attention_heads"]
    return ModelConfig(
        arch="dream",
        vocab_size=raw["vocab_size"],
        d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        mlp_hidden=raw["intermediate_size"],
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        shift_logits=True,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_seq_len=raw.get("max_position_embeddings", 4096),
        mask_token_id=raw.get("mask_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=raw.get("torch_dtype"),
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: milliseconds per forward on one CPU core.
    "tiny": dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128),
    # Benchmarks and the embedded default model's order of magnitude.
    "small": dict(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=768
    ),
    # Benchmarks at a real model's proportions: LLaDA-8B's 126,464-token vocabulary, depth
    # (32 layers) and MLP ratio (3x), its width shrunk from 4096 to 512 to fit a CPU.
    "llada-vocab": dict(
        vocab_size=126464, d_model=512, n_layers=32, n_heads=8, n_kv_heads=8, mlp_hidden=1536
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named Marble-architecture config, e.g. `preset("tiny", mask_token_id=383)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields = dict(arch="marble", **PRESETS[name])
    fields.update(overrides)
    return ModelConfig(**fields)
