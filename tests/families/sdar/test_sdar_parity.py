"""SDAR's forward against upstream's tensors (../shared/reference/golden/sdar/golden_logits).

Case a: a full forward under generate.py's block mask (logits and every layer's input); case c
the same at block 8; case b generate.py's cached path call by call (prefill and the cache it
stores, the denoising call over it, the store call and the cache after it, the next block).
Every tensor within 1e-4. Batching (rows with caches of different lengths in one call) changes
no real row beyond float noise. Models and tensors on `--device` (conftest).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from marble.families.sdar.loader import load_sdar
from marble.families.sdar.model import SDAR
from marble.model.block_cache import BlockCache
from marble.model.block_causal import block_causal_bias
from tests.golden_cases import golden_tensors

TOLERANCE = 1e-4  # the golden compare rule; measured max |delta| is 1.5e-5 (logits up to 21)
BATCH_TOLERANCE = 1e-5  # batched vs alone, hidden states; measured max |delta| 1.2e-6
REFERENCE = Path(__file__).resolve().parents[4] / "shared" / "reference"
MODEL_DIR = REFERENCE / "sdar-tiny"
GOLDEN = REFERENCE / "golden" / "sdar" / "golden_logits.safetensors"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def model(device: torch.device) -> SDAR:
    return load_sdar(MODEL_DIR, device=device)


@pytest.fixture(scope="module")
def golden(device: torch.device) -> dict[str, torch.Tensor]:
    return golden_tensors(GOLDEN, device)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOLERANCE) -> float:
    assert got.shape == want.shape, what
    delta = (got - want).abs().max().item()
    log.info("%s: max |delta| %.2e", what, delta)
    assert delta <= tol, f"{what}: max |delta| {delta:.2e}"
    return delta


def _call(
    model: SDAR,
    ids: torch.Tensor,
    start: int,
    block: int,
    cache: BlockCache | None = None,
    store: bool = False,
) -> torch.Tensor:
    """ids [T] at positions start.. -> logits [T, V]."""
    positions = torch.arange(start, start + len(ids), device=ids.device)[None]
    return model.project(model(ids[None], positions, cache, store, block_length=block)[0])


def test_block_mask_is_generate_pys(golden: dict):
    positions = golden["a.position_ids"][None]
    bias = block_causal_bias(
        positions,
        4,
        torch.ones(1, 32, dtype=torch.bool, device=positions.device),
        None,
        torch.float32,
    )
    assert torch.equal(bias[0, 0] == 0, golden["a.allowed"])


def test_full_forward_logits_and_hidden_states(model: SDAR, golden: dict):
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in model.layers
    ]
    hooks.append(model.norm.register_forward_hook(lambda m, a, out: inputs.append(out)))
    try:
        logits = _call(model, golden["a.input_ids"], 0, 4)
    finally:
        for hook in hooks:
            hook.remove()
    deltas = [_close(logits, golden["a.logits"], "a logits")]
    assert len(inputs) == 4
    for i, state in enumerate(inputs):
        deltas.append(_close(state[0], golden[f"a.hidden_states.{i}"], f"a hidden {i}"))
    deltas.append(_close(_call(model, golden["c.input_ids"], 0, 8), golden["c.logits"], "c logits"))
    log.info("a/c logits and hidden states: max |delta| %.2e", max(deltas))


def _cache_equals(cache: BlockCache, golden: dict, name: str, length: int) -> None:
    assert cache.length == length and bool(cache.valid.all())
    for i, kv in enumerate(cache.layers):
        _close(kv.keys[0], golden[f"b.{name}.layer{i}.key"], f"{name} layer {i} keys")
        _close(kv.values[0], golden[f"b.{name}.layer{i}.value"], f"{name} layer {i} values")


def test_cached_path_call_by_call(model: SDAR, golden: dict):
    cache = model.new_cache(1)
    deltas = [
        _close(
            _call(model, golden["b.prefill_input_ids"], 0, 4, cache, True),
            golden["b.prefill_logits"],
            "prefill",
        )
    ]
    _cache_equals(cache, golden, "cache_after_prefill", 16)
    assert cache.nbytes == model.cache_bytes(16)
    block1 = _call(model, golden["b.block1_input_ids"], 16, 4, cache)
    deltas.append(_close(block1, golden["b.block1_logits"], "block1"))
    deltas.append(_close(block1, golden["b.full_forward_block1_rows"], "block1 vs full"))
    assert cache.length == 16, "a denoising call stores nothing"
    stored = _call(model, golden["b.block1_final_input_ids"], 16, 4, cache, True)
    deltas.append(_close(stored, golden["b.block1_store_logits"], "store call"))
    _cache_equals(cache, golden, "cache_after_block1", 20)
    block2 = _call(model, golden["b.block2_input_ids"], 20, 4, cache)
    deltas.append(_close(block2, golden["b.block2_logits"], "block2"))
    deltas.append(_close(block2, golden["b.full_forward_block2_rows"], "block2 vs full"))
    assert cache.length == 20
    log.info("b cached path: max |delta| %.2e", max(deltas))


def test_rows_with_different_cache_lengths_batch_as_alone(model: SDAR, golden: dict):
    """Three rows in one call: b's block 2 over its 20 cached slots, a's block at 16 over 16,
    c's block at 8 (block 4 here) over 8: hidden states as each alone, and storing the blocks
    extends each row's cache as alone."""
    b_ids = torch.cat((golden["b.prefill_input_ids"], golden["b.block1_final_input_ids"]))
    rows = [
        (b_ids, golden["b.block2_input_ids"], 20),
        (golden["a.input_ids"], None, 16),
        (golden["c.input_ids"], None, 8),
    ]
    caches, windows, alone, alone_caches = [], [], [], []
    for ids, block, n in rows:
        cache = model.new_cache(1)
        _call(model, ids[:n], 0, 4, cache, True)
        caches.append(cache)
        window = block if block is not None else ids[n : n + 4]
        windows.append(window)
        own = cache.copy_refs()
        positions = torch.arange(n, n + 4, device=ids.device)[None]
        alone.append(model(window[None], positions, own, True, block_length=4)[0])
        alone_caches.append(own)
    stacked = BlockCache.stack(caches)
    assert stacked.valid.sum(-1).tolist() == [20, 16, 8]
    positions = torch.stack([torch.arange(n, n + 4, device=b_ids.device) for _, _, n in rows])
    hidden = model(torch.stack(windows), positions, stacked, True, block_length=4)
    worst = 0.0
    for r in range(3):
        worst = max(worst, _close(hidden[r], alone[r], f"row {r}", BATCH_TOLERANCE))
        _close(model.project(hidden[r]), model.project(alone[r]), f"row {r} logits")
        pad = stacked.length - alone_caches[r].length
        assert stacked.valid[r, pad:].all() and not stacked.valid[r, :pad].any()
        for got, want in zip(stacked.layers, alone_caches[r].layers):
            _close(got.keys[r, :, pad:], want.keys[0], f"row {r} stored keys", BATCH_TOLERANCE)
            _close(
                got.values[r, :, pad:], want.values[0], f"row {r} stored values", BATCH_TOLERANCE
            )
    log.info("batched vs alone: max |delta| hidden %.2e", worst)


def test_store_needs_a_cache(model: SDAR, device: torch.device):
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="needs a cache"):
        model(ids, torch.arange(4, device=device)[None], write=True, block_length=4)
