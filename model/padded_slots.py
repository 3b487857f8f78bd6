"""A `SlotBatch` padded to a bucket of rows and window width, for a compiled forward whose
shapes must not vary: pad window positions and pad rows write only sink columns, and no row
reads past its `end`, so the real rows' keys, values and reads are what they were.

Knows the `SlotStore` layout (its flat write order and sink column), nothing of models.
"""

from __future__ import annotations

import dataclasses

import torch

from marble.model.compiled_forward import LENGTH_FLOOR, bucket, pad_to
from marble.model.kv_slots import SlotBatch, capacity_class


def pad_slots(slots: SlotBatch, rows: int, width: int) -> SlotBatch:
    """`slots` (B rows writing T positions each) as `rows` >= B rows writing `width` >= T, its
    columns read bucketed too (at most the storage's)."""
    store = slots.store
    b = len(slots.index)
    t = len(slots.flat) // (b * store.shape[1])
    heads, sink = store.shape[1], store.capacity
    dev = slots.index.device
    first = slots.first  # a view reads slots first..first+B-1
    view = slots.view and store.slots >= first + rows
    # Pad rows take the slots after the batch's (a view stays one) or else slot 0.
    if view:
        fill = torch.arange(first + b, first + rows, device=dev)
    else:
        fill = torch.zeros(rows - b, device=dev)
    index = torch.cat((slots.index, fill.to(slots.index.dtype)))
    # Every padded write goes to its slot's sink column, in the storage's flat row order
    # (`SlotStore.batch`): [slots * Hkv * (capacity + 1), Dh].
    head = torch.arange(heads, device=dev)
    flat = (index[:, None, None] * heads + head[None, :, None]) * (sink + 1) + sink
    flat = flat.expand(rows, heads, width).clone()
    flat[:b, :, :t] = slots.flat.view(b, heads, t)
    return dataclasses.replace(
        slots,
        index=index,
        flat=flat.reshape(-1),
        end=pad_to(slots.end, (rows,)),
        read=min(bucket(slots.read, LENGTH_FLOOR), sink + 1),
        view=view,
    )


def storage_shapes(context: int, max_rows: int) -> int:
    """The storage shapes a compiled forward over one store can meet: a capacity class up to
    the context's, times a power-of-two slot count up to `max_rows`'s (`round_slots`). A store
    short of the budget's room for its spare slots takes an exact count instead: a shape past
    this bound, which dynamo runs eager once its raised recompile limit is spent."""
    classes, size = 1, 16
    while size < context:
        size, classes = capacity_class(size + 1), classes + 1
    return classes * bucket(max_rows).bit_length()


def slot_key(slots: SlotBatch) -> tuple[int, bool, tuple[int, ...]]:
    """What a compile depends on beyond the tensors' shapes: columns read, view, storage."""
    return slots.read, slots.view, tuple(slots.store.keys[0].shape)


def mark_static(slots: SlotBatch) -> None:
    """Tell a CUDA-graph capture that the store's tensors keep their addresses: a graph that
    writes its inputs is otherwise not captured (the store is re-marked after it grows)."""
    for t in slots.store.keys + slots.store.values:
        torch._dynamo.mark_static_address(t)
