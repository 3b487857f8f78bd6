"""DiffusionGemma's compiled decoder forward: `decode` (a canvas over the rows' slots in one
store of each layer kind, a `SlotBatch` per kind) over padded buckets of batch and slot columns
read, with and without self-conditioning (two graphs a bucket). Padding (`pad_slots`) changes
no real row's numbers beyond kernel rounding. Knows nothing of requests or sampling.
"""

from __future__ import annotations

from torch import Tensor

from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model.compiled_forward import CompiledForward, bucket, pad_to, shape_bound
from marble.model.kv_slots import SlotBatch, SlotGroups
from marble.model.padded_slots import mark_static, pad_slots, slot_key, storage_shapes

MAX_BATCH = 64  # the batch the recompile bound is stated for (rows past it only add buckets)


class CompiledDecode:
    """Call as `DiffusionGemma.decode(canvas, positions, slots, self_cond, mask)`: logits
    [B, L, V]."""

    def __init__(self, model: DiffusionGemma, backend: str) -> None:
        self.model = model
        device = model.embed_tokens.weight.device
        context = model.cfg.max_position_embeddings
        storages = storage_shapes(context, MAX_BATCH)  # a forward reads one store per kind
        bound = shape_bound(MAX_BATCH, (context,), variants=2 * 2 * storages)
        self.forward = CompiledForward(self._decode, device, backend, bound)

    def _decode(
        self,
        canvas: Tensor,
        positions: Tensor,
        slots: dict[bool, SlotBatch],
        self_cond: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        groups = {sliding: SlotGroups.whole(batch) for sliding, batch in slots.items()}
        return self.model.decode(canvas, positions, groups, self_cond, mask)

    def __call__(
        self,
        canvas: Tensor,
        positions: Tensor,
        slots: dict[bool, SlotBatch],
        self_cond: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, length = canvas.shape
        bb = bucket(b)
        padded = {sliding: pad_slots(batch, bb, length) for sliding, batch in slots.items()}
        if self.forward.graphs:
            for batch in padded.values():
                mark_static(batch)
        if self_cond is not None:
            self_cond = pad_to(self_cond, (bb, *self_cond.shape[1:]))
            mask = pad_to(mask, (bb,), False) if mask is not None else None
        logits = self.forward(
            pad_to(canvas, (bb, length)),
            pad_to(positions, (bb, length)),
            padded,
            self_cond,
            mask,
            key=tuple(slot_key(batch) for batch in padded.values()),
        )
        return logits[:b]
