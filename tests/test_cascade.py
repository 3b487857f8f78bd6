"""Attention over keys in several places (`model/cascade.py`): a step's rows reading their own
slots and shared prefix runs get the attention over all their keys, as if concatenated, within
float32 rounding; the flash kernel's part is the plain attention's bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from marble.model import cascade
from marble.model.cascade import CascadeLayer, SharedKeys, additive, attention_lse, scores_lse
from marble.model.kv_slots import SlotStores

HEADS, KV, DIM = 4, 2, 16


class Heads:
    """An attention module's output projection that only joins heads."""

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale

    def output(self, out: Tensor) -> Tensor:
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)


def test_the_flash_part_is_plain_attention_and_the_scores_part_agrees():
    torch.manual_seed(0)
    q = torch.randn(3, HEADS, 5, DIM)
    k, v = torch.randn(3, KV, 9, DIM), torch.randn(3, KV, 9, DIM)
    bias = torch.zeros(3, 1, 5, 9).masked_fill(torch.rand(3, 1, 5, 9) < 0.3, -1e30)
    out, lse = attention_lse(q, k, v, bias)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, bias, enable_gqa=True))
    out2, lse2 = scores_lse(q, k, v, bias)  # GQA as is, no key head repeated
    assert (out2 - out).abs().max() < 1e-5 and (lse2 - lse).abs().max() < 1e-5
    wide_k, wide_v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    out3, lse3 = scores_lse(q, wide_k, wide_v, bias)  # one key head per query head
    assert (out3 - out2).abs().max() < 1e-6 and (lse3 - lse2).abs().max() < 1e-6


@pytest.mark.parametrize("kernel", ["flash", "scores"])
@pytest.mark.parametrize("scale", [None, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_rows_reading_shared_runs_attend_as_over_the_joined_keys(
    scale, masked, kernel, monkeypatch
):
    """Four rows in two slot stores; rows 0, 1 and 3 read one shared run (row 3 its first 6
    positions only, a second segment), row 2 reads nothing; with `masked`, each row's queries
    read only some of the run's keys (as a sliding window would). `scores`: every part by the
    float32 scores a GPU computes them with."""
    if kernel == "scores":
        monkeypatch.setattr(cascade, "attention_lse", scores_lse)
    torch.manual_seed(1)
    stores = SlotStores(1, KV, DIM, torch.device("cpu"), torch.float32)
    own = [5, 3, 8, 2]  # cached positions each row holds in its slot
    for i, n in enumerate(own):
        stores.add(f"r{i}", n + 4 if i != 2 else 40)
        stores.write(f"r{i}", 0, (torch.randn(KV, n, DIM), torch.randn(KV, n, DIM)))
    run_k, run_v = torch.randn(1, KV, 10, DIM), torch.randn(1, KV, 10, DIM)
    t = 4
    masks = torch.rand(4, t, 10) < 0.7 if masked else torch.ones(4, t, 10, dtype=torch.bool)
    masks[..., -1] = True  # every query reads a key of the run
    shared = [
        SharedKeys(torch.tensor([0, 1]), [run_k], [run_v], masks[[0, 1]] if masked else None),
        SharedKeys(torch.tensor([3]), [run_k[:, :, :6]], [run_v[:, :, :6]], masks[[3], :, :6]),
    ]
    keys = [f"r{i}" for i in range(4)]
    groups = stores.batch(keys, own, [4] * 4, 4)
    assert groups.order == [0, 1, 3, 2]  # row 2 is alone in a larger store
    q = torch.randn(4, HEADS, t, DIM)
    k, v = torch.randn(4, KV, t, DIM), torch.randn(4, KV, t, DIM)
    # Each row reads its slot's columns up to its end (cache, then window), no further.
    biases = [
        torch.zeros(len(batch.end), 1, t, batch.read).masked_fill(
            (torch.arange(batch.read) >= batch.end[:, None])[:, None, None], -1e30
        )
        for _, batch in groups.parts
    ]
    # Batch rows follow the stores' order: shared rows are given in it.
    order = groups.order
    by_batch = [
        SharedKeys(
            torch.tensor([order.index(r) for r in s.rows.tolist()]), s.keys, s.values, s.mask
        )
        for s in shared
    ]
    heads = Heads(scale)
    got = CascadeLayer(groups, by_batch, 0).attend(heads, q[order], k[order], v[order], biases)
    for b, r in enumerate(order):
        store = stores.store(keys[r])
        slot = store.slot(keys[r])
        mine_k = store.keys[0][slot : slot + 1, :, : own[r] + t]
        mine_v = store.values[0][slot : slot + 1, :, : own[r] + t]
        reads = [s for s in shared if r in s.rows.tolist()]
        all_k = torch.cat([s.keys[0] for s in reads] + [mine_k], dim=2)
        all_v = torch.cat([s.values[0] for s in reads] + [mine_v], dim=2)
        read = [masks[r, :, : s.keys[0].shape[2]] for s in reads]
        read = torch.cat(read + [torch.ones(t, own[r] + t, dtype=torch.bool)], dim=1)
        want = F.scaled_dot_product_attention(
            q[r : r + 1], all_k, all_v, attn_mask=read, scale=scale, enable_gqa=True
        )
        assert (got[b] - heads.output(want)[0]).abs().max() < 1e-5, r


def test_a_masked_run_makes_its_bias_once_for_every_layer(monkeypatch):
    """Every layer of a kind reads a shared run through the same window: its stacked bias is
    made by the first and kept (before: once per layer, a G x T x S tensor each time)."""
    torch.manual_seed(2)
    layers, t = 3, 4
    stores = SlotStores(layers, KV, DIM, torch.device("cpu"), torch.float32)
    for i in range(2):
        stores.add(f"r{i}", 8)
    groups = stores.batch(["r0", "r1"], [0, 0], [t, t], t)
    run = [(torch.randn(1, KV, 10, DIM), torch.randn(1, KV, 10, DIM)) for _ in range(layers)]
    mask = torch.rand(2, t, 10) < 0.6
    mask[..., 0] = True

    def shared() -> SharedKeys:
        return SharedKeys(torch.tensor([0, 1]), [k for k, _ in run], [v for _, v in run], mask)

    made = []
    monkeypatch.setattr(cascade, "additive", lambda m, dtype: made.append(m) or additive(m, dtype))
    kept = shared()
    bias = [torch.zeros(2, 1, t, t)]
    for layer in range(layers):
        q = torch.randn(2, HEADS, t, DIM)
        k, v = torch.randn(2, KV, t, DIM), torch.randn(2, KV, t, DIM)
        got = CascadeLayer(groups, [kept], layer).attend(Heads(), q, k, v, bias)
        fresh = CascadeLayer(groups, [shared()], layer).attend(Heads(), q, k, v, bias)
        assert torch.equal(got, fresh)
    assert len(made) == 1 + layers  # the kept run's once, each fresh run's once
