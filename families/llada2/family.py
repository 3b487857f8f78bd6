"""The LLaDA2.x family for the engine: block-causal blocks aligned to absolute positions, an
exact cache of finished blocks, LLaDA2.1's joint unmask/edit rule in the model card's quality
mode by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marble.families.block_causal import BlockCausalFamily
from marble.families.llada2.config import MODEL_TYPE, PRESETS
from marble.families.llada2.loader import load_llada2
from marble.families.llada2.model import LLaDA2
from marble.families.llada2.runner import BlockRunner
from marble.scheduler.family import COMMON_FIELDS, Parts, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import (
    MAX_FORWARDS_PER_POSITION,
    InvalidParam,
    SamplingParams,
)

# LLaDA2.1's serving defaults: the model card's quality mode (its speed mode is threshold 0.5,
# editing_threshold 0.0).
PRESET = "quality"


def _edit_rounds(params: SamplingParams) -> int:
    """Mask-free forwards a block may take once filled (runner.py)."""
    return params.max_post_steps if params.editing_threshold is not None else 0


class LLaDA2Family(BlockCausalFamily):
    name = "llada2"
    parts = Parts(MODEL_TYPE, LLaDA2, load_llada2, BlockRunner)
    constrains = True
    required = {
        **BlockCausalFamily.required,
        "threshold": "this model unmasks by threshold: give threshold (not steps alone)",
    }
    fields = COMMON_FIELDS | frozenset(
        ("top_k", "top_p", "editing_threshold", "max_post_steps", "num_to_transfer")
    )

    @classmethod
    def defaults(cls, path: Path) -> dict[str, Any]:
        rule = PRESETS[PRESET]
        return {
            "block_length": rule.block_length,
            "threshold": rule.threshold,
            "editing_threshold": rule.editing_threshold,
            "max_post_steps": rule.max_post_steps,
            "num_to_transfer": rule.num_to_transfer,
            "temperature": rule.temperature,
        }

    @classmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        # A block takes up to one forward per position to fill, then its edit rounds.
        size = params.block_length
        limit = (MAX_FORWARDS_PER_POSITION - 1) * size
        if _edit_rounds(params) > limit:
            raise InvalidParam(
                "max_post_steps",
                f"max_post_steps ({params.max_post_steps}) exceeds {limit}: a block of {size} "
                f"tokens takes at most {MAX_FORWARDS_PER_POSITION} forwards per position, up "
                f"to {size} to fill it and {limit} edit rounds",
            )

    @classmethod
    def max_forwards(cls, request: Request, decoded: int) -> int:
        """Every decoded position filled by a forward of its own (at least one commits per
        forward while masks remain), then every block's edit rounds."""
        return decoded + len(request.blocks) * _edit_rounds(request.params)
