"""One model an engine serves (`ServedModel`): its weights, tokenizer, runner, serving defaults
and the limits its requests are checked against.

An engine steps every model it serves together: each step, the running requests of a model
share that model's runner, and the models take their forwards one after the other. Loading a
checkpoint folder into one is `load_served`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from marble.model.default import CHECKPOINT_DIR
from marble.model.device import resolve_dtype
from marble.model.diffusion_gemma import DiffusionGemma
from marble.model.diffusion_gemma_config import (
    DiffusionGemmaGenerationConfig,
    is_diffusion_gemma,
)
from marble.model.diffusion_gemma_loader import load_diffusion_gemma
from marble.model.llada2 import LLaDA2
from marble.model.llada2_config import PRESETS, is_llada2
from marble.model.llada2_loader import load_llada2
from marble.model.loader import load_model
from marble.model.tokenizer import SpecialIds, TextTokenizer
from marble.scheduler.block_runner import BlockRunner
from marble.scheduler.runner import ModelRunner
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import Runner
from marble.scheduler.uniform_runner import UniformRunner

# LLaDA2.1's serving defaults: the model card's quality mode (its speed mode is threshold 0.5,
# editing_threshold 0.0).
LLADA2_PRESET = "quality"

# The SamplingParams fields each kind of model reads (SamplingParams' docstring says how): what
# its `/v1/models` defaults and `request.queued` events show. A request may still send another
# kind's field: the engine refuses by name those a kind cannot honour (a self-correction or
# guidance it lacks) and ignores the rest, as before.
_SHARED_FIELDS = (
    "max_tokens",
    "block_length",
    "threshold",
    "temperature",
    "seed",
    "stop",
    "ignore_eos",
)
UNIFORM_FIELDS = frozenset(
    _SHARED_FIELDS
    + ("steps",)
    + ("entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
)
BLOCK_CAUSAL_FIELDS = frozenset(
    _SHARED_FIELDS + ("top_k", "top_p") + ("editing_threshold", "max_post_steps", "num_to_transfer")
)
MASKED_FIELDS = frozenset(
    _SHARED_FIELDS
    + ("steps", "top_k", "top_p", "remasking", "schedule", "cfg_scale")
    + ("token_healing", "cache", "verify_threshold")
)


@dataclass
class ServedModel:
    name: str  # what requests name it by (the OpenAI `model` field)
    model: torch.nn.Module
    tokenizer: TextTokenizer
    defaults: SamplingParams
    special: SpecialIds = field(init=False)
    # Uniform-state block diffusion (DiffusionGemma), block-causal masked diffusion with an
    # exact cache of finished blocks (LLaDA2), or a full-attention masked denoiser (LLaDA,
    # Dream, Marble's own): each has its runner and its step bookkeeping in the engine.
    uniform: bool = field(init=False)
    block_causal: bool = field(init=False)
    runner: Runner = field(init=False)
    context: int = field(init=False)  # longest canvas: prompt + generated + suffix
    vocab_size: int = field(init=False)  # ids the tokenizer can decode and the model score
    kv_bytes_per_token: int = field(init=False)  # masked models: per cached canvas position
    param_fields: frozenset[str] = field(init=False)  # the SamplingParams fields it reads

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        weight = next(self.model.parameters())
        self.special = self.tokenizer.special
        self.uniform = isinstance(self.model, DiffusionGemma)
        self.block_causal = isinstance(self.model, LLaDA2)
        self.param_fields = (
            UNIFORM_FIELDS
            if self.uniform
            else BLOCK_CAUSAL_FIELDS
            if self.block_causal
            else MASKED_FIELDS
        )
        self.vocab_size = min(len(self.tokenizer), cfg.vocab_size)
        if self.uniform:
            self.context = cfg.max_position_embeddings
            self.runner = UniformRunner(self.model)
            self.kv_bytes_per_token = 0  # its encoder cache prices itself (cache_bytes)
        elif self.block_causal:
            self.context = cfg.max_position_embeddings
            pad = self.special.pad if self.special.pad is not None else self.special.mask
            self.runner = BlockRunner(self.model, self.special.mask, pad, self.vocab_size)
            self.kv_bytes_per_token = self.model.cache_bytes(1)
        else:
            self.context = cfg.max_seq_len
            # Every layer keeps a key and a value vector per cached position.
            self.kv_bytes_per_token = (
                cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * weight.itemsize
            )
            pad = self.special.pad if self.special.pad is not None else self.special.mask
            self.runner = ModelRunner(self.model, self.special.mask, pad, self.vocab_size)
        _ = self.tokenizer.max_token_chars  # a vocabulary scan: at load, not in a request

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def shown_params(self, params: SamplingParams) -> dict[str, Any]:
        """`params` as JSON-ready values, only the fields this model reads."""
        return {k: v for k, v in params.to_dict().items() if k in self.param_fields}


def load_served(
    path: str | Path | None,
    name: str,
    device: str,
    dtype: torch.dtype | str,
    defaults: SamplingParams | None = None,
    progress: bool = True,
) -> ServedModel:
    """A local checkpoint folder (None: the embedded default model) on a resolved `device`;
    serving defaults stored with it apply unless given."""
    path = CHECKPOINT_DIR if path is None else Path(path)
    model: torch.nn.Module
    raw = json.loads((path / "config.json").read_text())
    if is_diffusion_gemma(raw):
        model = load_diffusion_gemma(path, device=device, dtype=resolve_dtype(dtype, device))
        arch = "diffusion_gemma"
    elif is_llada2(raw):
        model = load_llada2(path, device=device, dtype=resolve_dtype(dtype, device))
        arch = "llada2"
    else:
        dtype = resolve_dtype(dtype, device)
        model = load_model(path, device=device, dtype=dtype, progress=progress)
        arch = model.cfg.arch
    if defaults is None:
        defaults = load_defaults(path, arch)
    return ServedModel(name, model, TextTokenizer(path), defaults)


def load_defaults(path: str | Path, arch: str = "marble") -> SamplingParams:
    """Serving defaults stored with a checkpoint (`marble_defaults.json`) over Marble's own;
    a Dream checkpoint's fixed-step schedule is Dream's unless the file says otherwise, and
    a DiffusionGemma checkpoint's come from its generation config (one canvas, its steps,
    temperature schedule, entropy budget and stop rule), and an LLaDA2 checkpoint's are
    LLaDA2.1's joint unmask/edit rule in the model card's quality mode."""
    file = Path(path) / "marble_defaults.json"
    stored = json.loads(file.read_text()) if file.exists() else {}
    family: dict[str, object] = {"schedule": "dream" if arch == "dream" else "llada"}
    if arch == "diffusion_gemma":
        gen = DiffusionGemmaGenerationConfig.from_folder(path)
        family = {
            "max_tokens": gen.max_new_tokens,
            "block_length": json.loads((Path(path) / "config.json").read_text())["canvas_length"],
            "steps": gen.max_denoising_steps,
            "temperature": 1.0,  # the schedule as it stands (0: greedy block refinement)
            "t_min": gen.t_min,
            "t_max": gen.t_max,
            "entropy_bound": gen.entropy_bound,
            "stability_threshold": gen.stability_threshold,
            "confidence_threshold": gen.confidence_threshold,
            "cache": "none",  # the Fast-dLLM caches are for masked models; this one has its own
        }
    elif arch == "llada2":
        rule = PRESETS[LLADA2_PRESET]
        family = {
            "block_length": rule.block_length,
            "threshold": rule.threshold,
            "editing_threshold": rule.editing_threshold,
            "max_post_steps": rule.max_post_steps,
            "num_to_transfer": rule.num_to_transfer,
            "temperature": rule.temperature,
            "cache": "none",  # block-causal attention: its cache of finished blocks is exact
        }
    return SamplingParams.from_dict({**family, **stored})
