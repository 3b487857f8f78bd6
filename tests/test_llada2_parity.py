"""LLaDA2's forward against upstream's tensors (../shared/reference/golden/llada2).

Strict block-causal logits, each layer's input and the routers' logits and choices of case a;
logits of case c; case b through the block cache: the 40-token prefix written, then the
cached block call, with the cached keys/values themselves. Every tensor within 1e-4. Batching
(stacked caches of different lengths, padded windows, several blocks in one window) changes
no real row beyond float noise. Models and tensors on `--device` (conftest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from marble.families.llada2.loader import load_llada2
from marble.families.llada2.model import LLaDA2
from marble.model.block_cache import BlockCache, LayerKV
from tests.golden_cases import golden_tensors

TOLERANCE = 1e-4  # golden compare rule; measured max |delta| is 1.4e-5
BATCH_TOLERANCE = 1e-5  # batched vs alone, hidden states: other shapes; measured <= 1.3e-6
BLOCK = 8
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "llada2-tiny"
GOLDEN = REFERENCE / "golden" / "llada2" / "golden_logits.safetensors"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)


@pytest.fixture(scope="module")
def model(device: torch.device) -> LLaDA2:
    return load_llada2(MODEL_DIR, device=device)


@pytest.fixture(scope="module")
def golden(device: torch.device) -> dict[str, torch.Tensor]:
    return golden_tensors(GOLDEN, device)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOLERANCE) -> None:
    assert got.shape == want.shape, what
    delta = (got - want).abs().max().item()
    assert delta <= tol, f"{what}: max |delta| {delta:.2e}"


def _batched_close(model: LLaDA2, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Hidden states [T, H] within float noise of the same rows alone; their logits within the
    golden rule (the head amplifies the noise ~8x: 1e-6 -> 1e-5 on this checkpoint)."""
    _close(got, want, what, BATCH_TOLERANCE)
    _close(model.project(got), model.project(want), f"{what} logits")


def _span(start: int, stop: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, stop, device=device)[None]


def _hidden(
    model: LLaDA2, ids: torch.Tensor, cache: BlockCache | None = None, **kw
) -> torch.Tensor:
    """ids [1, T] after the cache's slots -> final-normed hidden states [T, H]."""
    start = 0 if cache is None else cache.length
    positions = _span(start, start + ids.shape[1], ids.device)
    return model(ids, positions, cache, block_length=BLOCK, **kw)[0]


def _logits(
    model: LLaDA2, ids: torch.Tensor, cache: BlockCache | None = None, **kw
) -> torch.Tensor:
    """ids [1, T] after the cache's slots -> logits [T, V]."""
    return model.project(_hidden(model, ids, cache, **kw))


def test_strict_logits_hidden_states_and_routing(model: LLaDA2, golden: dict):
    inputs: list[torch.Tensor] = []
    routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in model.layers
    ]
    hooks.append(model.norm.register_forward_hook(lambda m, a, out: inputs.append(out)))
    for i in (1, 2):
        gate = model.layers[i].mlp.gate
        hooks.append(
            gate.register_forward_hook(
                lambda m, a, out, i=i: routed.__setitem__(i, (a[0] @ m.weight.T, out[1]))
            )
        )
    try:
        logits = _logits(model, golden["a.input_ids"][None])
    finally:
        for hook in hooks:
            hook.remove()
    _close(logits, golden["a.logits"], "a logits")
    assert len(inputs) == 4
    for i, state in enumerate(inputs):
        _close(state[0], golden[f"a.hidden_states.{i}"], f"a hidden {i}")
    for i, (router_logits, experts) in routed.items():
        _close(router_logits, golden[f"a.router_logits.layer{i}"], f"a router logits {i}")
        assert torch.equal(experts, golden[f"a.router_topk_idx.layer{i}"]), f"a experts {i}"
    assert sorted(routed) == [1, 2]  # layer 0 is dense
    _close(_logits(model, golden["c.input_ids"][None]), golden["c.logits"], "c logits")


def test_block_call_over_the_written_cache(model: LLaDA2, golden: dict):
    ids = golden["b.input_ids"][None]
    cache = model.new_cache(1)
    _close(_logits(model, ids[:, :40], cache, write=True), golden["b.prefix_logits"], "prefix")
    assert cache.length == 40 and cache.nbytes == model.cache_bytes(40)
    for i, kv in enumerate(cache.layers):
        _close(kv.keys[0], golden[f"b.cache.layer{i}.key"], f"layer {i} keys")
        _close(kv.values[0], golden[f"b.cache.layer{i}.value"], f"layer {i} values")
    _close(_logits(model, ids[:, 40:], cache), golden["b.block_logits"], "cached block")
    assert cache.length == 40, "a call without write leaves the cache as it was"


def test_kept_keys_values_equal_written_ones(model: LLaDA2, golden: dict):
    ids = golden["b.input_ids"][None, :40]
    written, keep = model.new_cache(1), list[LayerKV]()
    _logits(model, ids, written, write=True)
    _logits(model, ids, model.new_cache(1), keep=keep)
    appended = model.new_cache(1)
    appended.append([kv.part([0], 8, 40) for kv in keep])
    for w, k, a in zip(written.layers, keep, appended.layers):
        assert torch.equal(w.keys, k.keys) and torch.equal(w.values, k.values)
        assert torch.equal(a.keys, k.keys[:, :, 8:])


def test_stacked_caches_of_different_lengths(model: LLaDA2, golden: dict):
    """Row b (40 cached, block 5) beside row a (24 cached, block 3): as alone."""
    a, b = golden["a.input_ids"], golden["b.input_ids"]
    rows = [(b, 40), (a, 24)]
    caches, alone = [], []
    for ids, n in rows:
        cache = model.new_cache(1)
        _hidden(model, ids[None, :n], cache, write=True)
        caches.append(cache)
        alone.append(_hidden(model, ids[None, n : n + BLOCK], cache))
    stacked = BlockCache.stack(caches)
    assert stacked.valid.sum(-1).tolist() == [40, 24]
    window = torch.stack([ids[n : n + BLOCK] for ids, n in rows])
    positions = torch.stack([torch.arange(n, n + BLOCK, device=a.device) for _, n in rows])
    hidden = model(window, positions, stacked, block_length=BLOCK)
    for row in range(2):
        _batched_close(model, hidden[row], alone[row], f"stacked row {row}")


def test_padded_windows_of_several_blocks(model: LLaDA2, golden: dict):
    """c (64 tokens, 8 blocks) beside a (32 tokens, right-padded): as alone; then a's last
    two blocks as one window over a cache of 16, written: the same states and cache."""
    c, a = golden["c.input_ids"], golden["a.input_ids"]
    ids = torch.stack((c, torch.cat((a, a.new_full((32,), 451)))))
    valid = torch.ones(2, 64, dtype=torch.bool, device=a.device)
    valid[1, 32:] = False
    span = _span(0, 64, a.device).expand(2, -1)
    hidden = model(ids, span, block_length=BLOCK, key_valid=valid)
    _batched_close(model, hidden[0], _hidden(model, c[None]), "c in a batch")
    full = model.new_cache(1)
    alone = _hidden(model, a[None], full, write=True)
    _batched_close(model, hidden[1, :32], alone, "right-padded a")
    cache = model.new_cache(1)
    _hidden(model, a[None, :16], cache, write=True)
    tail = _hidden(model, a[None, 16:], cache, write=True)
    _batched_close(model, tail, alone[16:], "a's last two blocks over the cache")
    for got, want in zip(cache.layers, full.layers):
        _close(got.keys, want.keys, "written keys", BATCH_TOLERANCE)
        _close(got.values, want.values, "written values", BATCH_TOLERANCE)


def test_write_needs_a_cache(model: LLaDA2, device: torch.device):
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="needs a cache"):
        model(ids, _span(0, 8, device), write=True, block_length=BLOCK)
