"""The SDAR family for the engine: block-causal blocks aligned to absolute positions, the
prompt's full blocks prefilled once, each block denoised over an exact cache of finished blocks
and then stored, as upstream's block_diffusion_generate() runs them (README.md in this folder).

Request fields map to SDAR's rule so: `steps` is the denoising steps PER BLOCK (step i commits
k_i = B // steps + (i < B % steps) masks, from the block length B); `remasking`
"low_confidence" with a `threshold` is low_confidence_dynamic at it (strictly above), with
`threshold` null low_confidence_static; `remasking` "sequential" is sequential (any threshold
unread). Other remasking rules are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marble.families.block_causal import BlockCausalFamily
from marble.families.sdar.config import MODEL_TYPE, Remasking, SDARDecodeSettings
from marble.families.sdar.loader import load_sdar
from marble.families.sdar.model import SDAR
from marble.families.sdar.runner import LOW_CONFIDENCE, SEQUENTIAL, SDARRunner, rule_of
from marble.scheduler.family import COMMON_FIELDS, Parts, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import InvalidParam, SamplingParams


class SDARFamily(BlockCausalFamily):
    name = "sdar"
    parts = Parts(MODEL_TYPE, SDAR, load_sdar, SDARRunner)
    fields = COMMON_FIELDS | frozenset(("steps", "remasking", "top_k", "top_p"))
    constrains = True
    required = {
        **BlockCausalFamily.required,
        # Every rule takes its per-step count k_i from the steps per block.
        "steps": "this model denoises each block in steps: give steps",
    }

    @classmethod
    def defaults(cls, path: Path) -> dict[str, Any]:
        """SDARDecodeSettings' defaults: the training block of 4, one token a step, the dynamic
        rule at 0.9, greedy."""
        settings = SDARDecodeSettings()
        dynamic = settings.remasking == Remasking.DYNAMIC
        sequential = settings.remasking == Remasking.SEQUENTIAL
        return {
            "block_length": settings.block_length,
            "steps": settings.steps,
            "threshold": settings.confidence_threshold if dynamic else None,
            "remasking": SEQUENTIAL if sequential else LOW_CONFIDENCE,
            "temperature": settings.temperature,
            "top_k": settings.top_k,
            "top_p": settings.top_p,
        }

    @classmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        if params.remasking not in (LOW_CONFIDENCE, SEQUENTIAL):
            raise InvalidParam(
                "remasking",
                f"remasking {params.remasking!r} is not an SDAR rule: give {LOW_CONFIDENCE!r} "
                f"(with a threshold: dynamic; without: static) or {SEQUENTIAL!r}",
            )

    @classmethod
    def planned_steps(cls, request: Request) -> int | None:
        """The static and sequential rules' forwards, fixed by the schedule: the prefill, per
        block the steps its masks take and its store (None under the dynamic rule)."""
        params = request.params
        if rule_of(params) == Remasking.DYNAMIC:
            return None
        size, steps = params.block_length, params.steps
        counts = [size // steps + (i < size % steps) for i in range(min(steps, size))]

        def denoising(masks: int) -> int:
            done = 0
            for n, k in enumerate(counts, 1):
                done += k
                if done >= masks:
                    return n
            return len(counts)

        tail = request.block_offset
        prefill = 1 if len(request.prompt_ids) >= size else 0
        first = denoising(size - tail)
        return prefill + first + (len(request.blocks) - 1) * denoising(size) + len(request.blocks)

    @classmethod
    def max_forwards(cls, request: Request, decoded: int) -> int:
        """The prefill, then per block up to min(steps, B) denoising forwards (each commits at
        least k_i >= 1 while masks remain) and its store."""
        size, steps = request.params.block_length, request.params.steps
        prefill = 1 if len(request.prompt_ids) >= size else 0
        return prefill + len(request.blocks) * (min(steps, size) + 1)
