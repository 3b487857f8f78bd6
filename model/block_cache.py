"""The KV cache of finished blocks, shared by every block-wise model family.

Per layer it holds keys (norms and RoPE applied) and values of tokens that will not change
again (DiffusionGemma's encoded prompt and canvases, LLaDA2's prompt blocks and finished
blocks), plus which slots are real. Sliding layers (optional) keep the last `window - 1` slots,
the others every slot. Rows are right-aligned: slot s of every row is the same slot index, and a
row shorter than the batch is padded on the left with slots marked not `valid`. The models'
reference path (`forward`, `encode`, `decode` over one cache per request, stacked for a batch:
a copy per step); the runners keep their rows in place instead (`kv_slots.SlotStore`). Knows
nothing of weights, attention rules, sampling or requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from marble.model.kv_slots import Attends


@dataclass
class LayerKV:
    """One layer's keys and values, [B, Hkv, S, Dh] each."""

    keys: Tensor
    values: Tensor

    def part(self, rows: Tensor | list[int] | slice, start: int, stop: int) -> LayerKV:
        """Slots [start, stop) of some rows: e.g. one row's finished block out of a forward's
        fresh window keys and values, to append to that row's own cache."""
        return LayerKV(self.keys[rows, :, start:stop], self.values[rows, :, start:stop])

    def join(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """These keys/values followed by a window's fresh k/v [B, Hkv, T, Dh] (copies both)."""
        return torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)

    def attend(
        self,
        attention: Attends,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor,
    ) -> Tensor:
        """`attention.attend(q, keys, values, bias)` over these keys/values and the window's."""
        return attention.attend(q, *self.join(k, v), bias)


@dataclass
class BlockCache:
    layers: list[LayerKV]
    sliding: tuple[bool, ...]  # per layer: keeps only the last `window - 1` slots
    window: int  # sliding layers' attention window (unused when no layer slides)
    valid: Tensor  # [B, S_total] bool: False for pad slots (full-layer slot order)

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_shapes: list[tuple[int, int]],
        sliding: tuple[bool, ...] | None = None,
        window: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BlockCache:
        """An empty cache; kv_shapes[i] = (kv heads, head dim) of layer i; sliding None = no
        layer slides."""
        layers = [
            LayerKV(
                torch.empty(batch, h, 0, d, device=device, dtype=dtype),
                torch.empty(batch, h, 0, d, device=device, dtype=dtype),
            )
            for h, d in kv_shapes
        ]
        sliding = (False,) * len(kv_shapes) if sliding is None else tuple(sliding)
        if len(sliding) != len(kv_shapes):
            raise ValueError(f"{len(sliding)} sliding flags for {len(kv_shapes)} layers")
        if any(sliding) and window < 2:
            raise ValueError(f"sliding layers need a window >= 2, got {window}")
        valid = torch.empty(batch, 0, dtype=torch.bool, device=device)
        return cls(layers, sliding, window, valid)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        """Slots appended so far, pads included: the next position of an unpadded row."""
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held now."""
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.layers)

    def copy_refs(self) -> BlockCache:
        """A second cache over the same tensors: `extend` replaces tensors rather than writing
        into them, so this one keeps the state it had (a step's rollback point)."""
        return BlockCache(list(self.layers), self.sliding, self.window, self.valid)

    def stored(self, layer: int) -> int:
        """Slots layer `layer` holds (at most window - 1 for sliding layers)."""
        return self.layers[layer].keys.shape[2]

    def layer_valid(self, layer: int) -> Tensor:
        """[B, S_layer] bool: which of this layer's stored slots are real tokens."""
        return self.valid[:, self.length - self.stored(layer) :]

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Append [B, Hkv, T, Dh] keys/values to one layer, trimming sliding layers."""
        kv = self.layers[layer]
        k, v = torch.cat((kv.keys, keys), dim=2), torch.cat((kv.values, values), dim=2)
        if self.sliding[layer]:
            k, v = k[:, :, -(self.window - 1) :], v[:, :, -(self.window - 1) :]
        self.layers[layer] = LayerKV(k.contiguous(), v.contiguous())

    def extend_valid(self, valid: Tensor) -> None:
        """Record [B, T] validity of the tokens just appended to every layer."""
        self.valid = torch.cat((self.valid, valid.to(torch.bool)), dim=1)

    def append(self, layers: list[LayerKV], valid: Tensor | None = None) -> None:
        """Append T slots to every layer at once (keys/values [B, Hkv, T, Dh] per layer) with
        their [B, T] validity (None: all real)."""
        if len(layers) != len(self.layers):
            raise ValueError(f"{len(layers)} layers of keys/values for {len(self.layers)}")
        for i, kv in enumerate(layers):
            self.extend(i, kv.keys, kv.values)
        if valid is None:
            b, _, t, _ = layers[0].keys.shape
            valid = torch.ones(b, t, dtype=torch.bool, device=self.valid.device)
        self.extend_valid(valid)

    def rows(self, index: Tensor | list[int]) -> BlockCache:
        """The cache of a subset of rows (copies), left padding kept."""
        index = torch.as_tensor(index, device=self.valid.device)
        layers = [LayerKV(kv.keys[index], kv.values[index]) for kv in self.layers]
        return BlockCache(layers, self.sliding, self.window, self.valid[index])

    @staticmethod
    def stack(caches: list[BlockCache]) -> BlockCache:
        """One batch from per-request caches of any lengths: shorter ones left-padded."""
        first = caches[0]
        total = max(c.length for c in caches)

        def left_pad(t: Tensor, size: int, dim: int) -> Tensor:
            shape = list(t.shape)
            shape[dim] = size - t.shape[dim]
            return torch.cat((t.new_zeros(shape), t), dim=dim)

        layers = []
        for i in range(len(first.layers)):
            s = max(c.stored(i) for c in caches)
            keys = torch.cat([left_pad(c.layers[i].keys, s, 2) for c in caches])
            values = torch.cat([left_pad(c.layers[i].values, s, 2) for c in caches])
            layers.append(LayerKV(keys, values))
        valid = torch.cat([left_pad(c.valid, total, 1) for c in caches])
        return BlockCache(layers, first.sliding, first.window, valid)
