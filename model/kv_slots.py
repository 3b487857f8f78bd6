"""KV storage that stays in place: one model's keys and values for every running request, per
layer [slots, Hkv, capacity + 1, Dh], slot i the i-th running row, slot position p the key at
absolute position p (a cache holds positions 0..length-1 with no gaps).

A step writes its window's fresh keys and values into the rows' slots and attention reads the
slots back as a view: nothing already cached is copied. Copies happen only where counted in
`copied`: growing a store (once for the rows added since it last grew) or releasing its
spare slots, refilling a finished row's slot with the last row, a batch whose rows are not
consecutive slots in order (an index gather), and blocks read out for a prefix cache or
written in from one (or a masked row's block-start keys and values). Knows nothing of
weights or attention rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor


class Attends(Protocol):
    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q [B, Hq, T, D] over k/v [B, Hkv, S, D], a mask or bias per row -> [B, T, H]."""
        ...


def capacity_class(tokens: int) -> int:
    """The capacity of the store a row of `tokens` positions goes to: the smallest 2^k, 1.25,
    1.5 or 1.75 x 2^k (at least 16) that holds them, so a slot wastes at most a fifth of itself
    and rows of similar lengths share a store."""
    size = 16
    while size < tokens:
        size += (1 << (size.bit_length() - 1)) // 4
    return size


@dataclass
class KVRoom:
    """Bytes of the KV budget that spare slots made by growing a store may take (a compiled
    forward's power-of-two slot counts): what admission left after reserving the running
    rows' own slots. Shared by a model's stores; unbounded outside an engine."""

    left: float = float("inf")


class SlotStore:
    """Slots of `capacity` positions for the running rows of one model's capacity class
    (`capacity_class`), allocated on first use; column `capacity` of every slot is a sink for
    the writes of window padding.

    A new row takes a spare slot, or the store grows by the slots it needs (a copy). Growth
    waits for the first read or write after the adds, so rows admitted together grow it once:
    one copy of the rows already there, and one transient of old and new storage, instead of
    one per row. A row that leaves leaves its slot spare, taken by the next row or given up by
    `release` (a copy), so the store holds its rows' slots (what admission reserved for them)
    and its spare ones. `round_slots` keeps the slot count a power of two, for a compiled
    forward, which compiles once per storage shape, where `room` holds the spare slots that
    makes (else the count is exact: one more shape, rather than bytes past the budget)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int,
    ) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self._keys: list[Tensor] = []  # the storage; rows past its slots are waiting for it
        self._values: list[Tensor] = []
        self.order: list[str] = []  # slot i holds the row of request order[i]
        self.capacity = capacity  # positions each slot holds
        self.round_slots = False
        self.room = KVRoom()
        self.copied = 0  # bytes of stored keys and values copied so far (see module doc)

    @property
    def keys(self) -> list[Tensor]:
        """Each layer's keys [slots, Hkv, capacity + 1, Dh], every added row's slot in them."""
        self.grow()
        return self._keys

    @property
    def values(self) -> list[Tensor]:
        self.grow()
        return self._values

    @property
    def slots(self) -> int:
        self.grow()
        return self._allocated

    @property
    def _allocated(self) -> int:
        return self._keys[0].shape[0] if self._keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes of storage held now (0 once no row is running)."""
        return sum(t.nbytes for t in self.keys + self.values)

    @property
    def spare_bytes(self) -> int:
        """Bytes of the slots no row holds."""
        return self.slot_nbytes * (self.slots - len(self.order))

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot: every layer's keys and values, the sink column included."""
        layers, heads, dim = self.shape
        return 2 * layers * heads * (self.capacity + 1) * dim * self.dtype.itemsize

    def add(self, key: str, tokens: int, start: int = 0) -> SlotCache:
        """A slot for a new row that will cache at most `tokens` positions, from absolute
        position `start` on (those before it are held elsewhere)."""
        if key in self.order:
            raise ValueError(f"row {key!r} already holds a slot")
        if tokens > self.capacity:
            raise ValueError(f"a row of {tokens} positions in slots of {self.capacity}")
        slot = len(self.order)
        if slot < self._allocated:  # a spare slot (a new one is allocated zeroed)
            for t in self._keys + self._values:
                t[slot].zero_()  # a finite start: masked keys still meet the values (0 * NaN)
        self.order.append(key)
        return SlotCache(self, key, start, start)

    def remove(self, key: str) -> None:
        """Free a row's slot: the last row moves into it so running rows stay slots 0..n-1,
        and the last slot is spare (the storage goes once no row is left). Rows still waiting
        for storage get it first."""
        if key not in self.order:
            return
        slot, last = self.order.index(key), len(self.order) - 1
        if slot != last:
            for t in self.keys + self.values:
                t[slot].copy_(t[last])
                self.copied += t[last].nbytes
            self.order[slot] = self.order[last]
        self.order.pop()
        if not self.order:
            self._keys, self._values = [], []

    def release(self) -> int:
        """Give up the spare slots (past a power of two with `round_slots`); returns the bytes
        freed."""
        before, slots = self.nbytes, self._slots_for(len(self.order))
        if slots < self.slots:
            self._allocate(slots)
        return before - self.nbytes

    def _slots_for(self, rows: int) -> int:
        return 1 << (rows - 1).bit_length() if self.round_slots and rows else rows

    def grow(self) -> None:
        """Give every row added since the storage last held them all its slot (one growth
        for all of them); otherwise made on the store's first read or write."""
        rows = len(self.order)
        if rows <= self._allocated:
            return
        slots = self._slots_for(rows)
        spare = (slots - rows) * self.slot_nbytes
        if spare > self.room.left:
            slots, spare = rows, 0
        self.room.left -= spare
        self._allocate(slots)

    def _allocate(self, slots: int) -> None:
        """Storage of `slots` slots, the rows' keys and values copied."""
        layers, heads, dim = self.shape
        shape = (slots, heads, self.capacity + 1, dim)
        # Plain tensors even when a step grows it: rows are removed outside inference mode.
        with torch.inference_mode(False):
            fresh = [
                torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2 * layers)
            ]
            n = min(len(self.order), self._allocated)  # rows waiting for storage have none yet
            for new, old in zip(fresh, self._keys + self._values):
                new[:n].copy_(old[:n])
                self.copied += old[:n].nbytes
        if self.device.type == "cuda":
            # A CUDA graph replays reads and writes of these very buffers instead of copying
            # them into its own inputs (a compiled forward recompiles once per growth).
            for t in fresh:
                torch._dynamo.mark_static_address(t)
        self._keys, self._values = fresh[:layers], fresh[layers:]

    def slot(self, key: str) -> int:
        return self.order.index(key)

    def read(self, key: str, start: int, length: int) -> Tensor:
        """A copy of a row's keys and values in columns [start, start + length) of its slot:
        [2 * layers, kv_heads, length, head_dim], keys first (a prefix cache's block part)."""
        slot, end = self.order.index(key), start + length
        block = torch.stack([t[slot, :, start:end] for t in self.keys + self.values])
        self.copied += block.nbytes
        return block

    def write(self, key: str, start: int, block: Sequence[Tensor]) -> None:
        """Put what `read` returns (or any 2 * layers parts [kv_heads, length, head_dim], keys
        first) into a row's slot from column `start` on."""
        slot = self.order.index(key)
        for t, part in zip(self.keys + self.values, block, strict=True):
            t[slot, :, start : start + part.shape[1]].copy_(part)
            self.copied += part.nbytes

    def span(self, keys: list[str]) -> tuple[int, int]:
        """The fewest consecutive slots holding every row of `keys`: (first, count)."""
        slots = [self.order.index(k) for k in keys]
        return min(slots), max(slots) - min(slots) + 1

    def view(self, first: int, count: int, columns: int) -> list[tuple[Tensor, Tensor]]:
        """Each layer's keys and values of slots [first, first + count), positions
        [0, columns): views of the storage (writes through them land in it)."""
        rows, cols = slice(first, first + count), slice(0, columns)
        return [(k[rows, :, cols], v[rows, :, cols]) for k, v in zip(self.keys, self.values)]

    def batch(self, keys: list[str], lengths: list[int], widths: list[int], t: int) -> SlotBatch:
        """The slots of a step's rows (in this order): row i holds `lengths[i]` columns and
        writes a window of `widths[i]` real positions (right-padded to `t`) after them."""
        slots = [self.order.index(k) for k in keys]
        read = max(n + w for n, w in zip(lengths, widths))
        dev = self.device
        span = torch.arange(t, device=dev)
        start = torch.tensor(lengths, device=dev)
        end = start + torch.tensor(widths, device=dev)
        # Padding writes land in the sink column, never read.
        cols = torch.where(
            start[:, None] + span < end[:, None], start[:, None] + span, self.capacity
        )
        first = slots[0]
        view = slots == list(range(first, first + len(keys)))
        if not view:
            layers, heads, dim = self.shape
            self.copied += 2 * layers * len(keys) * heads * read * dim * self.keys[0].itemsize
        index = torch.tensor(slots, device=dev)
        # Each written key's row in the storage seen as [slots * Hkv * (capacity + 1), Dh].
        heads = torch.arange(self.shape[1], device=dev)
        flat = (index[:, None, None] * self.shape[1] + heads[None, :, None]) * (self.capacity + 1)
        flat = (flat + cols[:, None, :]).reshape(-1)
        return SlotBatch(self, index, flat, end, read, view, first)


@dataclass
class SlotCache:
    """A row's handle on its slot: how many positions are final (the slot's column c holding
    position `start` + c). Rolling a row back is restoring its handle (a step writes only past
    `length`)."""

    store: SlotStore
    key: str
    length: int = 0
    start: int = 0

    def copy_refs(self) -> SlotCache:
        return replace(self)

    def advance(self, tokens: int) -> None:
        """The first `tokens` positions of the window just written are final."""
        self.length += tokens


@dataclass
class SlotBatch:
    """One step's rows in a `SlotStore`: where each row's window goes and how far to read."""

    store: SlotStore
    index: Tensor  # [B] the rows' slots
    flat: Tensor  # [B * Hkv * T] where each window key is written (see SlotStore.batch)
    end: Tensor  # [B] positions readable per row: its cache, then its window
    read: int  # positions read per row: the longest row's end
    view: bool  # the rows are slots first..first+B-1 in order: reads are views of the storage
    first: int = 0  # the first row's slot

    def join(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a window's fresh k/v [B, Hkv, T, Dh] into the rows' slots -> every readable
        key and value, [B, Hkv, read, Dh] (a view of the storage when `view`)."""
        keys, values = self.store.keys[layer], self.store.values[layer]
        # index_copy_ on the flattened storage: advanced-index assignment is ~1000x slower on CPU.
        keys.view(-1, k.shape[-1]).index_copy_(0, self.flat, k.reshape(-1, k.shape[-1]))
        values.view(-1, v.shape[-1]).index_copy_(0, self.flat, v.reshape(-1, v.shape[-1]))
        if self.view:
            rows = slice(self.first, self.first + len(self.index))
            return keys[rows, :, : self.read], values[rows, :, : self.read]
        read = slice(None), slice(None), slice(0, self.read)
        return keys[read].index_select(0, self.index), values[read].index_select(0, self.index)


class SlotStores:
    """One model's rows in `SlotStore`s, one per capacity class: the bytes held are the rows'
    slots (what admission reserved), whatever their mix of lengths, and spare slots (given up
    on demand, `release`); one store for every length would give each slot the longest row's
    capacity."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        room: KVRoom | None = None,
    ) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.stores: dict[int, SlotStore] = {}  # by capacity
        self._of: dict[str, SlotStore] = {}  # each row's store
        self._round_slots = False
        self.room = room or KVRoom()  # every store's (a runner may share one between stores)

    def round_slots(self) -> None:
        """Round every store's slot count up to a power of two from now on (`SlotStore`)."""
        self._round_slots = True
        for store in self.stores.values():
            store.round_slots = True

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    @property
    def copied(self) -> int:
        return sum(store.copied for store in self.stores.values())

    @property
    def spare_bytes(self) -> int:
        return sum(store.spare_bytes for store in self.stores.values())

    def grow(self) -> None:
        """Give every added row its storage now (otherwise made on a store's first use)."""
        for store in self.stores.values():
            store.grow()

    def release(self, nbytes: float) -> int:
        """Give up spare slots, store by store, until `nbytes` are freed (or none is left);
        returns the bytes freed."""
        freed = 0
        for store in self.stores.values():
            if freed >= nbytes:
                break
            freed += store.release()
        return freed

    def add(self, key: str, tokens: int, start: int = 0) -> SlotCache:
        """A slot for a new row that will cache at most `tokens` positions from `start` on,
        in the store of their capacity class."""
        capacity = capacity_class(tokens)
        if capacity not in self.stores:
            store = SlotStore(*self.shape, self.device, self.dtype, capacity)
            store.round_slots = self._round_slots
            store.room = self.room
            self.stores[capacity] = store
        cache = self.stores[capacity].add(key, tokens, start)
        self._of[key] = self.stores[capacity]
        return cache

    def remove(self, key: str) -> None:
        store = self._of.pop(key, None)
        if store is not None:
            store.remove(key)

    def store(self, key: str) -> SlotStore:
        """The store holding row `key`."""
        return self._of[key]

    def place(self, key: str) -> tuple[int, int]:
        """Where row `key` is: its store's capacity, its slot there (the order of `batch`)."""
        store = self._of[key]
        return store.capacity, store.slot(key)

    def read(self, key: str, start: int, length: int) -> Tensor:
        return self._of[key].read(key, start, length)

    def write(self, key: str, start: int, block: Sequence[Tensor]) -> None:
        self._of[key].write(key, start, block)

    def batch(self, keys: list[str], lengths: list[int], widths: list[int], t: int) -> SlotGroups:
        """`SlotStore.batch` over rows in any stores: the rows ordered by store, then slot (so
        a step over a store's every row reads it as a view), one `SlotBatch` per store."""
        place = {k: self.place(k) for k in keys}
        order = sorted(range(len(keys)), key=lambda i: place[keys[i]])
        parts: list[tuple[slice, SlotBatch]] = []
        start = 0
        while start < len(order):
            store = self._of[keys[order[start]]]
            stop = start
            while stop < len(order) and self._of[keys[order[stop]]] is store:
                stop += 1
            rows = order[start:stop]
            batch = store.batch(
                [keys[i] for i in rows], [lengths[i] for i in rows], [widths[i] for i in rows], t
            )
            parts.append((slice(start, stop), batch))
            start = stop
        return SlotGroups(order, parts)


class HeldInStores:
    """The KV accounting of a runner whose rows' keys and values live in `self.stores`."""

    stores: SlotStores

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV storage held now: the running rows' slots and spare ones."""
        return self.stores.nbytes

    @property
    def spare_kv_bytes(self) -> int:
        return self.stores.spare_bytes

    def release_kv(self, nbytes: float) -> int:
        return self.stores.release(nbytes)

    @property
    def kv_room(self) -> KVRoom:
        return self.stores.room

    def grow_kv(self) -> None:
        self.stores.grow()


@dataclass
class SlotGroups:
    """One step's rows across a model's stores: batch row r is the caller's row `order[r]`,
    and each part is the rows (a slice of the batch) of one store with their `SlotBatch`."""

    order: list[int]
    parts: list[tuple[slice, SlotBatch]]

    @classmethod
    def whole(cls, batch: SlotBatch) -> SlotGroups:
        """A batch of one store's rows, in its own order."""
        return cls(list(range(len(batch.index))), [(slice(None), batch)])

    def layer(self, layer: int) -> SlotGroupsLayer:
        return SlotGroupsLayer(self, layer)


@dataclass
class SlotGroupsLayer:
    """One layer of a `SlotGroups`, what a decoder layer attends through: each store's rows
    attend over their own slots (`biases` per part), the outputs joined in batch order."""

    groups: SlotGroups
    layer: int

    def attend(
        self,
        attention: Attends,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        biases: list[Tensor],
    ) -> Tensor:
        """`attention.attend(q, keys, values, bias)` per part, for the part's rows of q and of
        the window's fresh k/v (written into their slots first)."""
        outs = []
        for (rows, batch), bias in zip(self.groups.parts, biases, strict=True):
            keys, values = batch.join(self.layer, k[rows], v[rows])
            outs.append(attention.attend(q[rows], keys, values, bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
