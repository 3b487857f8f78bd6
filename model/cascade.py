"""Attention over keys held in several places, read where they are (cascade attention): each
row's own slot, and the shared prefix runs it reads from a prefix cache. Each part's softmax is
computed apart with its log-sum-exp and the parts are merged exactly (up to rounding); the rows
that read one run have their queries stacked into one attention over it, so a shared prefix is
read once per step, not once per row.

Knows nothing of how the keys got there: `SharedKeys` are views handed in by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from marble.model.kv_slots import SlotGroups


def attention_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention q [B, Hq, T, D] over k/v [B, Hkv, S, D] (Hq a multiple of Hkv, query
    head h reading key head h // (Hq / Hkv)), additive bias [B, 1, T, S] or None, scores
    scaled by `scale` (None: D ** -0.5) -> (out [B, Hq, T, D] in q's dtype, log-sum-exp of
    the scaled scores [B, Hq, T] float32). On CPU the flash kernel
    `scaled_dot_product_attention` runs (its `out` bit for bit; it reads each key head for its
    query heads, no copy); elsewhere `scores_lse`."""
    if q.device.type != "cpu":
        return scores_lse(q, k, v, bias, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    return out, lse


def scores_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """`attention_lse` with the scores in float32 (no fused kernel returns the log-sum-exp on
    every device). Each key head's query heads are stacked into one matrix against it, so the
    keys and values are read as they are, never repeated per query head."""
    b, heads, t, dim = q.shape
    kv = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    stacked = q.float().reshape(b, kv, heads // kv * t, dim)  # query head h = kv head h // group
    scores = (torch.matmul(stacked, k.float().transpose(-1, -2)) * scale).view(
        b, kv, heads // kv, t, -1
    )
    if bias is not None:
        scores = scores + bias.float()[:, :, None]  # [B, 1, 1, T, S]: every head alike
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None]).view(b, kv, heads // kv * t, -1)
    out = torch.matmul(weights, v.float()).view(b, heads, t, dim)
    return out.to(q.dtype), lse.view(b, heads, t)


@dataclass
class SharedKeys:
    """Keys and values that several rows of a step read (finished prompt blocks before the
    rows' windows): every one visible to every query of those rows, or as `mask` says."""

    rows: Tensor  # [G] the batch rows that read them
    keys: list[Tensor]  # per layer [1, Hkv, S, D]
    values: list[Tensor]
    mask: Tensor | None = None  # bool [G, T, S]: which keys each row's query reads
    _biases: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict, repr=False)

    def stacked_bias(self, group: int, dtype: torch.dtype) -> Tensor | None:
        """`mask` as an additive bias for the rows' queries stacked per key head, `group`
        query heads each: [1, 1, G * group * T, S] (None: no mask). Made once and kept, since
        every layer that reads these keys with a mask reads the same one."""
        if self.mask is None:
            return None
        if (group, dtype) not in self._biases:
            g, t, s = self.mask.shape
            mask = self.mask[:, None].expand(g, group, t, s).reshape(1, 1, g * group * t, s)
            self._biases[group, dtype] = additive(mask, dtype)
        return self._biases[group, dtype]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True: read) as an additive bias; a finite fill, not -inf, so a query that
    reads no key gets a harmless average instead of NaN."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


def merge(out: Tensor, lse: Tensor, part: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two attentions of the same queries over disjoint keys -> the attention over both:
    float32 out [.., T, D] and its log-sum-exp [.., T]."""
    both = torch.logaddexp(lse, part_lse)
    mixed = (
        out * torch.exp(lse - both)[..., None]
        + part.float() * torch.exp(part_lse - both)[..., None]
    )
    return mixed, both


class Projects(Protocol):
    scale: float | None  # of the scores (None: head_dim ** -0.5)

    def output(self, out: Tensor) -> Tensor:
        """Attention's out [B, Hq, T, D] -> the layer's [B, T, H] (heads joined, projected)."""
        ...


@dataclass
class CascadeLayer:
    """One layer of a step whose rows read their slots (`groups`) and shared keys: what the
    layer attends through instead of a `SlotGroupsLayer` (`attend` takes the same arguments;
    a row that reads no shared keys gets the plain attention's numbers bit for bit on CPU)."""

    groups: SlotGroups
    shared: list[SharedKeys]
    layer: int

    def attend(
        self,
        attention: Projects,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        biases: list[Tensor],
    ) -> Tensor:
        """q [B, Hq, T, D] and the window's fresh k/v (written into the slots first) ->
        `attention.output` of the attention over them all; `biases` per store part, additive
        or bool masks."""
        outs, lses = [], []
        scale = attention.scale
        for (rows, batch), bias in zip(self.groups.parts, biases, strict=True):
            keys, values = batch.join(self.layer, k[rows], v[rows])
            if bias.dtype == torch.bool:
                bias = additive(bias, q.dtype)
            out, lse = attention_lse(q[rows], keys, values, bias, scale)
            outs.append(out)
            lses.append(lse)
        out = (outs[0] if len(outs) == 1 else torch.cat(outs)).float()
        lse = lses[0] if len(lses) == 1 else torch.cat(lses)
        b, heads, t, dim = q.shape
        for shared in self.shared:
            keys, values = shared.keys[self.layer], shared.values[self.layer]
            g, kv = len(shared.rows), keys.shape[1]
            # The rows' queries as one long sequence per key head: the keys are read once.
            stacked = (
                q[shared.rows]
                .reshape(g, kv, heads // kv, t, dim)
                .transpose(0, 1)
                .reshape(1, kv, g * heads // kv * t, dim)
            )
            bias = shared.stacked_bias(heads // kv, q.dtype)
            part, part_lse = attention_lse(stacked, keys, values, bias, scale)
            part = part.view(kv, g, heads // kv, t, dim).transpose(0, 1).reshape(g, heads, t, dim)
            part_lse = part_lse.view(kv, g, heads // kv, t).transpose(0, 1).reshape(g, heads, t)
            mixed, both = merge(out[shared.rows], lse[shared.rows], part, part_lse)
            out[shared.rows] = mixed
            lse[shared.rows] = both
        return attention.output(out.to(q.dtype))
