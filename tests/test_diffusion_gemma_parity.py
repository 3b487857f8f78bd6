"""DiffusionGemma's two modes against upstream's tensors (../shared/reference/golden).

Each golden call is re-made as generate() made it (golden_logits.json `call`): the prompt
encode with its cache, three decoder calls (with and without self-conditioning), a canvas
commit and a decoder call after it. Every tensor within 1e-4; the decoder never writes the
cache; batching, left padding and stacking per-request caches change no real row. Models
and tensors on `--device` (conftest).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from marble.families.diffusion_gemma.loader import load_diffusion_gemma
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model.block_cache import BlockCache
from tests.golden_cases import golden_tensors

TOLERANCE = 1e-4  # golden compare rule; measured max |delta| is 2.7e-5
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "diffusiongemma-tiny"
GOLDEN = REFERENCE / "golden" / "diffusiongemma" / "golden_logits.safetensors"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)


@pytest.fixture(scope="module")
def model(device: torch.device) -> DiffusionGemma:
    return load_diffusion_gemma(MODEL_DIR, device=device)


@pytest.fixture(scope="module")
def golden(device: torch.device) -> dict[str, torch.Tensor]:
    return golden_tensors(GOLDEN, device)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    delta = (got - want).abs().max().item()
    assert delta <= TOLERANCE, f"{what}: max |delta| {delta:.2e}"


def _check_cache(cache: BlockCache, golden: dict, prefix: str) -> None:
    for i, kv in enumerate(cache.layers):
        _close(kv.keys[0], golden[f"{prefix}.cache.layer{i}.keys"], f"{prefix} layer {i} keys")
        _close(kv.values[0], golden[f"{prefix}.cache.layer{i}.values"], f"{prefix} layer {i} v")


def _positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]


def _encoded_prompt(model: DiffusionGemma, golden: dict) -> tuple[BlockCache, torch.Tensor]:
    cache = model.new_cache(1)
    ids = golden["enc_prompt.input_ids"][None]
    hidden = model.encode(ids, golden["enc_prompt.position_ids"][None], cache)
    return cache, hidden


def test_every_golden_tensor(model: DiffusionGemma, golden: dict):
    cache, hidden = _encoded_prompt(model, golden)
    _close(hidden[0], golden["enc_prompt.last_hidden_state"], "enc_prompt hidden")
    _close(model.head(hidden)[0], golden["enc_prompt.logits_from_head"], "enc_prompt head")
    assert [cache.stored(i) for i in range(6)] == [23, 23, 33, 23, 23, 33]
    _check_cache(cache, golden, "enc_prompt")

    canvas_a = golden["dec1.decoder_input_ids"][None]
    pos = golden["dec1.decoder_position_ids"][None]
    states: list[torch.Tensor] = []
    dec1 = model.decode(canvas_a, pos, cache, hidden_states=states)
    _close(dec1[0], golden["dec1.logits"], "dec1")
    assert len(states) == 7
    for i, state in enumerate(states):
        _close(state[0], golden[f"dec1.hidden_states.{i}"], f"dec1 hidden {i}")
    sc = golden["dec1_sc.self_conditioning_logits"][None]
    _close(sc[0], golden["dec1.logits"] / 0.8, "dec1_sc input")
    _close(model.decode(canvas_a, pos, cache, sc)[0], golden["dec1_sc.logits"], "dec1_sc")
    sc2 = golden["dec2.self_conditioning_logits"][None]
    dec2 = model.decode(golden["dec2.decoder_input_ids"][None], pos, cache, sc2)
    _close(dec2[0], golden["dec2.logits"], "dec2")
    assert cache.length == 33, "the decoder must not write the cache"
    _check_cache(cache, golden, "enc_prompt")

    chunk = golden["enc_chunk.input_ids"][None]
    hidden = model.encode(chunk, golden["enc_chunk.position_ids"][None], cache)
    _close(hidden[0], golden["enc_chunk.last_hidden_state"], "enc_chunk hidden")
    _close(model.head(hidden)[0], golden["enc_chunk.logits_from_head"], "enc_chunk head")
    assert [cache.stored(i) for i in range(6)] == [23, 23, 49, 23, 23, 49]
    _check_cache(cache, golden, "enc_chunk")
    sc3 = golden["dec3.self_conditioning_logits"][None]
    dec3_ids = golden["dec3.decoder_input_ids"][None]
    dec3 = model.decode(dec3_ids, _positions(49, 16, dec3_ids.device), cache, sc3)
    assert golden["dec3.decoder_position_ids"].tolist() == list(range(49, 65))
    _close(dec3[0], golden["dec3.logits"], "dec3")


def test_self_conditioning_mask_off_equals_none(model: DiffusionGemma, golden: dict):
    cache, _ = _encoded_prompt(model, golden)
    canvas = golden["dec1.decoder_input_ids"][None]
    pos = _positions(33, 16, canvas.device)
    sc = golden["dec1_sc.self_conditioning_logits"][None]
    off = model.decode(canvas, pos, cache, sc, torch.tensor([False], device=canvas.device))
    assert torch.equal(off, model.decode(canvas, pos, cache))


def test_left_padding_and_stacked_caches_leave_rows_unchanged(model: DiffusionGemma, golden: dict):
    """A left-padded batch, and per-request caches stacked, give each row's alone logits."""
    prompt = golden["enc_prompt.input_ids"]
    short = prompt[:20]
    canvas = golden["dec1.decoder_input_ids"]
    alone = []
    caches = []
    for ids in (prompt, short):
        cache = model.new_cache(1)
        model.encode(ids[None], _positions(0, len(ids), ids.device), cache)
        caches.append(cache)
        alone.append(model.decode(canvas[None], _positions(len(ids), 16, ids.device), cache))
    pad = len(prompt) - len(short)
    batch = torch.stack((prompt, torch.cat((short.new_zeros(pad), short))))
    valid = batch.new_ones(batch.shape, dtype=torch.bool)
    valid[1, :pad] = False
    cache = model.new_cache(2)
    # Positions count the pads (as upstream's generate): row 1 sits at pad..P-1.
    model.encode(batch, _positions(0, len(prompt), batch.device).expand(2, -1), cache, valid)
    after = _positions(len(prompt), 16, batch.device)
    padded = model.decode(canvas.expand(2, -1), after.expand(2, -1), cache)
    _close(padded[0], alone[0][0], "padded batch row 0")
    # Row 1's positions are shifted by the pads; RoPE is relative, so logits barely move.
    _close(padded[1], alone[1][0], "padded batch row 1")
    stacked = BlockCache.stack(caches)
    pos = torch.stack((after[0], _positions(len(short), 16, batch.device)[0]))
    both = model.decode(canvas.expand(2, -1), pos, stacked)
    _close(both[0], alone[0][0], "stacked row 0")
    _close(both[1], alone[1][0], "stacked row 1")
    assert int(stacked.rows([1]).valid.sum()) == len(short)


def test_loader_skips_vision_with_a_note(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="marble.families.diffusion_gemma.loader"):
        load_diffusion_gemma(MODEL_DIR)
    assert "image inputs are not supported" in caplog.text
