"""What every block-causal family shares (LLaDA2, SDAR): blocks aligned to absolute positions,
so the prompt's tail shares the first block and decoding runs through the end of the last block
it reaches; a cache that ends up holding the prompt and every block but the last; and the
runner's part that does not depend on the decoding rule (a row's canvas, its generator and
cache, right-padded windows written into and read from the runner's `SlotStore` in place).
Its models are `model/block_causal.py` stacks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Self

import torch
from torch import Tensor

from marble.model.block_causal import BlockCausalStack
from marble.model.cascade import SharedKeys
from marble.model.compiled_block_causal import CompiledSlots
from marble.model.compiled_forward import CompiledForward
from marble.model.kv_slots import HeldInStores, SlotCache, SlotStores, capacity_class
from marble.model.prefix_cache import Block, readers
from marble.scheduler.family import Family, Served
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import CachedRowsRunner, request_generator


class BlockCausalFamily(Family):
    shares_prefixes = True  # a finished block depends only on the tokens up to its end
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
        """Its slot: the prompt and every block (the last one's keys are a step's scratch),
        in the slot's capacity class, and the sink column (`kv_slots.SlotStores`); less, once
        admitted, what it reads from the prefix cache (`CachedRowsRunner.claim_prefix`)."""
        return slot_bytes(m.model, len(request.prompt_ids) + decoded)


def slot_bytes(model: BlockCausalStack, positions: int) -> int:
    """The bytes of a slot that holds `positions` (its capacity class and the sink column)."""
    return model.cache_bytes(capacity_class(positions) + 1)


def canvas_length(request: Request) -> int:
    """The prompt, then every position through the end of the last block it reaches."""
    size = request.params.block_length
    assert size is not None  # the family refuses a block-causal request without one
    return -(-(len(request.prompt_ids) + request.params.max_tokens) // size) * size


@dataclass
class BlockRow:
    """A block-causal runner's row: its generator, cache and canvas."""

    generator: torch.Generator
    cache: SlotCache  # keys and values of every position before `cache.length` are final
    canvas: Tensor  # [L] prompt, then masks through the end of the last block
    prompt_len: int
    size: int  # block length

    def saved(self) -> Self:
        """A copy to roll back to (canvas writes replace the tensor; a step writes its slot
        only past `cache.length`)."""
        return replace(self, cache=self.cache.copy_refs())


class BlockCausalRunner(CachedRowsRunner, HeldInStores):
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
        layers = len(model.layers)
        self.stores = SlotStores(layers, model.kv_heads, model.head_dim, self.device, self.dtype)
        self._compiled: CompiledSlots | None = None  # the slot forward, once compiled

    def compile_forward(self, backend: str) -> CompiledForward:
        """Run every window forward (prefill and denoise) compiled from now on."""
        context = self.model.cfg.max_position_embeddings
        self._compiled = CompiledSlots(self.model, backend, context)
        self.stores.round_slots()  # few storage shapes, each a compile
        return self._compiled.forward

    def remove(self, request_id: str) -> None:
        super().remove(request_id)
        self.stores.remove(request_id)

    def read_prefix(self, key: str, start: int, length: int) -> Block:
        return (self.stores.read(key, start - self.rows[key].cache.start, length),)

    def prefix_size(self, request: Request) -> int:
        assert request.params.block_length is not None
        return request.params.block_length

    @property
    def reads_in_place(self) -> bool:
        """A compiled forward's shapes do not vary with what rows share: it takes a copy."""
        return self._compiled is None

    def cached_positions(self, request: Request) -> int:
        return canvas_length(request)

    def slot_bytes(self, positions: int) -> int:
        return slot_bytes(self.model, positions)

    def new_row_state(self, request: Request) -> tuple[torch.Generator, SlotCache, Tensor]:
        """A new row's generator, cache and canvas: the prompt, then masks through the end of
        the last block it reaches. Its prompt blocks in the prefix cache are final at once:
        read where they are (a slot for the positions after them) or, compiled, copied."""
        key, prompt = request.request_id, request.prompt_ids
        total = canvas_length(request)
        canvas = torch.full((total,), self.mask_id, dtype=torch.long, device=self.device)
        canvas[: len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        if self.prefix_cache is None or not request.params.prefix_cache:
            cache = self.stores.add(key, total)
        elif self.reads_in_place:
            taken = self.share_in_place(request)
            cache = self.stores.add(key, total - taken, start=taken)
        else:
            cache = self.stores.add(key, total)

            def write(start: int, block: Block) -> None:
                self.stores.write(key, start, block[0])

            size = self.prefix_size(request)
            cache.advance(self.prefix_cache.attach(key, prompt, size, write))
        return request_generator(request, self.device), cache, canvas

    def forward_windows(self, rows: list[Any], spans: list[tuple[int, int]]) -> Tensor:
        """One batched forward of each row's window [a, e) of its canvas (right-padded), a
        being where its cache ends, each row's blocks its own size -> hidden [R, T, H]. The
        windows' keys and values are written into the rows' slots; a row keeps a prefix of
        its window with `row.cache.advance`."""
        dev = self.device
        if any(a != row.cache.length for row, (a, _) in zip(rows, spans)):
            raise ValueError("a window must start where its row's cache ends")
        longest = max(e - a for a, e in spans)
        slots = self.stores.batch(
            [row.cache.key for row in rows],
            [a - row.cache.start for row, (a, _) in zip(rows, spans)],
            [e - a for a, e in spans],
            longest,
        )
        # In the stores' order (store by store, slot by slot): a step over a store's every
        # running row reads it as a view.
        order = slots.order
        rows, spans = [rows[i] for i in order], [spans[i] for i in order]
        n = len(rows)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long, device=dev)
        positions = torch.zeros((n, longest), dtype=torch.long, device=dev)
        for i, (row, (a, e)) in enumerate(zip(rows, spans)):
            ids[i, : e - a] = row.canvas[a:e]
            positions[i, : e - a] = torch.arange(a, e, device=dev)
        sizes = torch.tensor([row.size for row in rows], device=dev)
        if self._compiled is None:
            starts = torch.tensor([row.cache.start for row in rows], device=dev)
            shared = self._shared_keys([row.cache.key for row in rows])
            hidden = self.model.forward_slots(ids, positions, slots, sizes, starts, shared)
        else:  # one compiled forward per store: each sees one storage's shapes
            hidden = torch.cat(
                [
                    self._compiled(ids[part], positions[part], batch, sizes[part])
                    for part, batch in slots.parts
                ]
            )
        if order == sorted(order):
            return hidden
        back = torch.tensor(sorted(range(n), key=order.__getitem__), device=dev)
        return hidden[back]

    def _shared_keys(self, keys: list[str]) -> list[SharedKeys]:
        """What the step's rows (batch rows, in order) read from the prefix cache: one
        `SharedKeys` per run segment, with every row that reads it."""
        layers = len(self.model.layers)
        shared = []
        for segment, rows in readers(self.shared, keys).items():
            (parts,) = segment.parts()  # [2 * layers, Hkv, length, D], keys first
            kv = [parts[i : i + 1] for i in range(2 * layers)]
            index = torch.tensor(rows, device=self.device)
            shared.append(SharedKeys(index, kv[:layers], kv[layers:]))
        return shared
