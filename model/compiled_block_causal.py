"""A block-causal stack's slot forward (`forward_slots`: prefill and denoise windows over the
rows' caches in place) compiled over padded buckets of batch, window and slot columns read.
Padding (`pad_slots`) changes no real row's numbers beyond kernel rounding; pad rows see no
key and are dropped. Knows nothing of families, sampling or requests.
"""

from __future__ import annotations

from torch import Tensor

from marble.model.block_causal import BlockCausalStack
from marble.model.compiled_forward import LENGTH_FLOOR, CompiledForward, bucket, pad_to, shape_bound
from marble.model.kv_slots import SlotBatch, SlotGroups
from marble.model.padded_slots import mark_static, pad_slots, slot_key, storage_shapes

MAX_BATCH = 64  # the batch the recompile bound is stated for (rows past it only add buckets)


class CompiledSlots:
    """Call as `BlockCausalStack.forward_slots`: hidden [B, T, H]."""

    def __init__(self, model: BlockCausalStack, backend: str, context: int) -> None:
        self.model = model
        device = model.lm_head.weight.device
        storages = storage_shapes(context, MAX_BATCH)  # a forward reads one store
        bound = shape_bound(MAX_BATCH, (context, context + 1), variants=2 * storages)
        self.forward = CompiledForward(self._forward, device, backend, bound)

    def _forward(
        self, ids: Tensor, positions: Tensor, slots: SlotBatch, block_length: Tensor
    ) -> Tensor:
        return self.model.forward_slots(ids, positions, SlotGroups.whole(slots), block_length)

    def __call__(
        self, ids: Tensor, positions: Tensor, slots: SlotBatch, block_length: Tensor
    ) -> Tensor:
        b, t = ids.shape
        bb, tb = bucket(b), bucket(t, LENGTH_FLOOR)
        padded = pad_slots(slots, bb, tb)
        if self.forward.graphs:
            mark_static(padded)
        hidden = self.forward(
            pad_to(ids, (bb, tb)),
            pad_to(positions, (bb, tb)),
            padded,
            pad_to(block_length, (bb,), 1),
            key=slot_key(padded),
        )
        return hidden[:b, :t]
