"""What every block-causal family shares (LLaDA2, SDAR): blocks aligned to absolute positions,
so the prompt's tail shares the first block and decoding runs through the end of the last block
it reaches; a cache that ends up holding the prompt and every block but the last; and the
runner's part that does not depend on the decoding rule (a row's canvas, its generator and
cache, right-padded windows over the rows' caches stacked). Its models are
`model/block_causal.py` stacks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Self

import torch
from torch import Tensor

from marble.model.block_cache import BlockCache, LayerKV
from marble.model.block_causal import BlockCausalStack
from marble.scheduler.family import Family, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import CachedRowsRunner, request_generator


class BlockCausalFamily(Family):
    required = {"block_length": "this model denoises in blocks: give block_length"}

    @classmethod
    def context(cls, model: torch.nn.Module) -> int:
        return model.cfg.max_position_embeddings

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


@dataclass
class BlockRow:
    """A block-causal runner's row: its generator, cache and canvas."""

    generator: torch.Generator
    cache: BlockCache  # keys and values of every position before `cache.length`, final
    canvas: Tensor  # [L] prompt, then masks through the end of the last block
    prompt_len: int
    size: int  # block length

    def saved(self) -> Self:
        """A copy to roll back to (canvas writes replace the tensor; see BlockCache)."""
        return replace(self, cache=self.cache.copy_refs())


class BlockCausalRunner(CachedRowsRunner):
    """A block-causal family's runner, less its step (`_step`, over `self.rows`)."""

    def __init__(self, model: BlockCausalStack, mask_id: int, pad_id: int, vocab_limit: int):
        super().__init__()
        self.model = model
        self.mask_id = mask_id
        self.pad_id = pad_id
        # Ids the tokenizer cannot decode and the mask itself are never committed or edited in.
        self.vocab_limit = vocab_limit
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype

    def new_row_state(self, request: Request) -> tuple[torch.Generator, BlockCache, Tensor]:
        """A new row's generator, empty cache and canvas: the prompt, then masks through the
        end of the last block it reaches."""
        size = request.params.block_length
        assert size is not None  # the family refuses a block-causal request without one
        prompt = request.prompt_ids
        total = -(-(len(prompt) + request.params.max_tokens) // size) * size
        canvas = torch.full((total,), self.mask_id, dtype=torch.long, device=self.device)
        canvas[: len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return request_generator(request, self.device), self.model.new_cache(1), canvas

    def forward_windows(
        self, rows: list[Any], spans: list[tuple[int, int]]
    ) -> tuple[Tensor, list[LayerKV]]:
        """One batched forward of each row's window [a, e) of its canvas (right-padded) over
        its cache (stacked), each row's blocks its own size -> hidden [R, T, H] and each
        layer's fresh keys and values, for the caller to append the parts it keeps."""
        dev = self.device
        longest = max(e - a for a, e in spans)
        n = len(rows)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long, device=dev)
        positions = torch.zeros((n, longest), dtype=torch.long, device=dev)
        key_valid = torch.zeros((n, longest), dtype=torch.bool, device=dev)
        for i, (row, (a, e)) in enumerate(zip(rows, spans)):
            ids[i, : e - a] = row.canvas[a:e]
            positions[i, : e - a] = torch.arange(a, e, device=dev)
            key_valid[i, : e - a] = True
        cache = rows[0].cache if n == 1 else BlockCache.stack([row.cache for row in rows])
        keep: list[LayerKV] = []
        sizes = torch.tensor([row.size for row in rows], device=dev)
        hidden = self.model(
            ids, positions, cache, block_length=sizes, key_valid=key_valid, keep=keep
        )
        return hidden, keep
