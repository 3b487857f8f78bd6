"""The masked family's compiled cached forward: `Denoiser.forward_cached` (the prefix or dual
cache step) over one slot store's whole storage, read and written in place (its shapes are the
storage's: a power of two of slots, a capacity class of columns), the queries padded to a
bucket of their length.

Padding changes no real row's numbers beyond kernel rounding: pad queries write their keys to
the storage's sink column, which every row masks. Knows nothing of requests or sampling.
"""

from __future__ import annotations

from torch import Tensor

from marble.families.masked.model import CachedPart, Denoiser
from marble.model.compiled_forward import LENGTH_FLOOR, CompiledForward, bucket, pad_to, shape_bound
from marble.model.padded_slots import storage_shapes

MAX_BATCH = 64  # the batch the recompile bound is stated for (rows past it only add buckets)


class CompiledCached:
    """Call as `Denoiser.forward_cached(..., project=False)` over one part, every row of the
    batch: a store's whole storage (its `layers` [S, Hkv, K, Dh], the sink column K - 1 past
    every row's keys) -> hidden states [S, W, D]."""

    def __init__(self, model: Denoiser, backend: str) -> None:
        self.model = model
        device = next(model.parameters()).device
        context = model.cfg.max_seq_len
        storages = storage_shapes(context, MAX_BATCH)  # a forward reads one store
        bound = shape_bound(1, (context,), variants=storages)
        self.forward = CompiledForward(self._forward, device, backend, bound)

    def _forward(
        self,
        ids: Tensor,
        positions: Tensor,
        keys: list[Tensor],
        values: list[Tensor],
        slots: Tensor,
        key_mask: Tensor,
        gather: Tensor,
    ) -> Tensor:
        part = CachedPart(slice(None), list(zip(keys, values, strict=True)), key_mask)
        return self.model.forward_cached(ids, positions, [part], slots, gather, project=False)

    def __call__(
        self,
        ids: Tensor,
        positions: Tensor,
        part: CachedPart,
        slots: Tensor,
        gather: Tensor,
    ) -> Tensor:
        b, q = ids.shape
        sink = part.layers[0][0].shape[2] - 1
        assert part.key_mask is not None and part.layers[0][0].shape[0] == b
        qb = bucket(q, LENGTH_FLOOR)
        hidden = self.forward(
            pad_to(ids, (b, qb)),
            pad_to(positions, (b, qb)),
            [k for k, _ in part.layers],
            [v for _, v in part.layers],
            pad_to(slots, (b, qb), sink),
            part.key_mask,
            pad_to(gather, (b, qb)),
        )
        return hidden[:, : gather.shape[1]]
