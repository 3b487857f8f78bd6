"""What every block-causal family answers alike (LLaDA2, SDAR): blocks aligned to absolute
positions, so the prompt's tail shares the first block and decoding runs through the end of
the last block it reaches, and a cache that ends up holding the prompt and every block but the
last. Its models are `model/block_causal.py` stacks."""

from __future__ import annotations

import torch

from marble.scheduler.family import Family, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import InvalidParam, SamplingParams


class BlockCausalFamily(Family):
    @classmethod
    def context(cls, model: torch.nn.Module) -> int:
        return model.cfg.max_position_embeddings

    @classmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        if params.block_length is None:
            raise InvalidParam("block_length", "this model denoises in blocks: give block_length")
        if suffix:
            raise InvalidParam("suffix", "suffix (infilling) is not supported by this model")

    @classmethod
    def decoded_tokens(cls, m: Served, prompt_len: int, params: SamplingParams) -> int:
        """Through the end of the last block it reaches."""
        size = params.block_length
        return -(-(prompt_len + params.max_tokens) // size) * size - prompt_len

    @classmethod
    def block_offset(cls, prompt_len: int, params: SamplingParams) -> int:
        """Blocks are aligned to absolute positions: the prompt's tail shares the first."""
        return prompt_len % params.block_length

    @classmethod
    def kv_bytes(cls, m: Served, request: Request, decoded: int) -> int:
        """The cache holds the prompt and every block but the last."""
        cached = len(request.prompt_ids) + decoded - request.params.block_length
        return m.model.cache_bytes(cached)
