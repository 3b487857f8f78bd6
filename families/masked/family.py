"""The full-attention masked family (LLaDA, Dream, Marble's own) for the engine: the fallback
family, serving every checkpoint and model no other family claims (its config refuses what it cannot
build, such as MoE checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from marble.families.masked.loader import load_model
from marble.families.masked.model import Denoiser
from marble.families.masked.runner import ModelRunner
from marble.model.checkpoint_config import model_type_of
from marble.model.kv_slots import capacity_class
from marble.scheduler.family import COMMON_FIELDS, Family, Parts, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import InvalidParam, SamplingParams


class MaskedFamily(Family):
    name = "masked"
    parts = Parts("", Denoiser, load_model, ModelRunner)
    fallback = True
    infills = True
    constrains = True
    fields = COMMON_FIELDS | frozenset(
        ("steps", "top_k", "top_p", "remasking", "schedule", "cfg_scale")
        + ("token_healing", "cache", "verify_threshold")
    )

    @classmethod
    def detects(cls, config: dict[str, Any]) -> bool:
        return True

    @classmethod
    def owns(cls, model: torch.nn.Module) -> bool:
        """Every model no other family claims (a Denoiser, or a test's stand-in for one)."""
        return True

    @classmethod
    def defaults(cls, path: Path) -> dict[str, Any]:
        """A Dream checkpoint's fixed-step schedule is Dream's; the others' LLaDA's."""
        config = path / "config.json"
        model_type = model_type_of(json.loads(config.read_text())) if config.exists() else ""
        return {"schedule": "dream" if model_type == "dream" else "llada"}

    @classmethod
    def context(cls, model: torch.nn.Module) -> int:
        return model.cfg.max_seq_len

    @classmethod
    def kv_bytes_per_token(cls, model: torch.nn.Module) -> int:
        """Every layer keeps a key and a value vector per cached position."""
        cfg = model.cfg
        itemsize = next(model.parameters()).itemsize
        return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * itemsize

    @classmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        """Every value of the fields it reads but SDAR's "sequential" remasking."""
        if params.remasking == "sequential":
            raise InvalidParam(
                "remasking", "remasking 'sequential' is SDAR's rule: this model does not run it"
            )

    @classmethod
    def kv_bytes(cls, m: Served, request: Request, decoded: int) -> int:
        if request.params.cache == "none":
            return 0
        copies = 2 if request.params.cfg_scale > 0 else 1  # CFG's unconditional copy has its own
        # Its slots: the canvas's capacity class, and the sink column (runner.py's stores).
        return copies * (capacity_class(request.canvas_len) + 1) * m.kv_bytes_per_token

    @classmethod
    def max_forwards(cls, request: Request, decoded: int) -> int:
        """Its planned steps (at most one per token), or under the threshold rule one per
        token (each forward commits at least one more than verify masks again). Never more
        than max_tokens: nothing to refuse."""
        planned = request.total_steps
        return request.params.max_tokens if planned is None else planned
