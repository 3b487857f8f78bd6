"""The masked family's compiled cached forward: `Denoiser.forward_cached` (the prefix or dual
cache step) run through `CompiledForward` over padded buckets of batch, query and key length.

Padding changes no real row's numbers beyond kernel rounding: pad queries write their keys to a
spare slot every real row masks, pad keys are masked, pad rows attend to zero keys only.
Knows nothing of requests or sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from marble.families.masked.model import CachedPart, Denoiser
from marble.model.compiled_forward import LENGTH_FLOOR, CompiledForward, bucket, pad_to, shape_bound

MAX_BATCH = 64  # the batch the recompile bound is stated for (rows past it only add buckets)


class CompiledCached:
    """Call as `Denoiser.forward_cached(..., project=False)` over one part (one store's rows,
    every row of the batch): hidden states [B, W, D]."""

    def __init__(self, model: Denoiser, backend: str) -> None:
        self.model = model
        device = next(model.parameters()).device
        context = model.cfg.max_seq_len
        bound = shape_bound(MAX_BATCH, (context, context + 2))
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
        cache, key_mask = part.layers, part.key_mask
        heads, k_len, dim = cache[0][0].shape[1:]
        bb, qb = bucket(b), bucket(q, LENGTH_FLOOR)
        kb = bucket(k_len + 1, LENGTH_FLOOR)  # at least one spare slot past every real key
        if key_mask is None:
            key_mask = torch.ones((b, k_len), dtype=torch.bool, device=ids.device)
        mask = pad_to(key_mask, (bb, kb), False)
        mask[b:] = True  # a pad row reads zero keys: finite, and no real row sees it
        shape = (bb, heads, kb, dim)
        hidden = self.forward(
            pad_to(ids, (bb, qb)),
            pad_to(positions, (bb, qb)),
            [pad_to(k, shape) for k, _ in cache],
            [pad_to(v, shape) for _, v in cache],
            pad_to(slots, (bb, qb), kb - 1),
            mask,
            pad_to(gather, (bb, qb)),
        )
        return hidden[:b, : gather.shape[1]]
