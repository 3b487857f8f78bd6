"""The DiffusionGemma family for the engine: uniform-state canvases of `canvas_length` that
start as noise, its generation config's sampler and stop rule as defaults, an encoder cache of
finished canvases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from marble.families.diffusion_gemma.config import (
    MODEL_TYPE,
    DiffusionGemmaGenerationConfig,
)
from marble.families.diffusion_gemma.loader import load_diffusion_gemma
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.families.diffusion_gemma.runner import UniformRunner, slot_bytes
from marble.scheduler.family import COMMON_FIELDS, Family, Parts, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import (
    MAX_FORWARDS_PER_POSITION,
    InvalidParam,
    SamplingParams,
)
from marble.scheduler.step_result import Runner


class DiffusionGemmaFamily(Family):
    name = "diffusion_gemma"
    parts = Parts(MODEL_TYPE, DiffusionGemma, load_diffusion_gemma, UniformRunner)
    masked = False  # canvases start as noise: there is no mask token to keep out of prompts
    canvases = True
    constrains = True  # a grammar prefix per canvas (grammar_prefix.py)
    shares_prefixes = True  # its encoder is causal: prompt pages (`runner.PROMPT_PAGE`)
    required = {"steps": "this model needs steps (denoising steps per canvas)"}
    fields = COMMON_FIELDS | frozenset(
        ("steps", "entropy_bound", "t_min", "t_max", "stability_threshold")
        + ("confidence_threshold",)
    )

    @classmethod
    def defaults(cls, path: Path) -> dict[str, Any]:
        """Its generation config: one canvas, its steps, temperature schedule, entropy budget
        and stop rule."""
        gen = DiffusionGemmaGenerationConfig.from_folder(path)
        return {
            "max_tokens": gen.max_new_tokens,
            "block_length": json.loads((Path(path) / "config.json").read_text())["canvas_length"],
            "steps": gen.max_denoising_steps,
            "temperature": 1.0,  # the schedule as it stands (0: greedy block refinement)
            "t_min": gen.t_min,
            "t_max": gen.t_max,
            "entropy_bound": gen.entropy_bound,
            "stability_threshold": gen.stability_threshold,
            "confidence_threshold": gen.confidence_threshold,
        }

    @classmethod
    def context(cls, model: torch.nn.Module) -> int:
        return model.cfg.max_position_embeddings

    @classmethod
    def runner(cls, served: Served) -> Runner:
        return UniformRunner(served.model)

    @classmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        length = m.model.cfg.canvas_length
        if params.block_length != length:
            raise InvalidParam(
                "block_length",
                f"this model denoises canvases of {length} tokens: block_length must be "
                f"{length} (or left out)",
            )
        limit = MAX_FORWARDS_PER_POSITION * length
        if params.steps > limit:
            raise InvalidParam(
                "steps",
                f"steps ({params.steps}) exceeds {limit}: a canvas of {length} tokens takes at "
                f"most {MAX_FORWARDS_PER_POSITION} denoising steps per position",
            )

    @classmethod
    def decoded_tokens(cls, m: Served, prompt_len: int, params: SamplingParams) -> int:
        """Whole canvases."""
        length = m.model.cfg.canvas_length
        return -(-params.max_tokens // length) * length

    @classmethod
    def planned_steps(cls, request: Request) -> int | None:
        """Its stop rule may end a canvas before its steps run out."""
        return None

    @classmethod
    def kv_bytes(cls, m: Served, request: Request, decoded: int) -> int:
        """Its slots: the prompt and every canvas (the last one's keys are a decode's scratch)
        in every layer, in the slots' capacity class, and the sink column
        (`kv_slots.SlotStores`, one per layer kind)."""
        return slot_bytes(m.model, len(request.prompt_ids) + decoded)

    @classmethod
    def max_forwards(cls, request: Request, decoded: int) -> int:
        """Every canvas runs all its steps (its stop rule never fires)."""
        return len(request.blocks) * (request.params.steps or 1)
