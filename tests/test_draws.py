"""`marble.model.draws`: the categorical draws equal `torch.multinomial(p, 1)`'s token for
token, and leave the generator where torch leaves it, at every chunking and dtype; and the
chunked vocabulary passes of `uniform_sampling` equal their whole-tensor definitions."""

from __future__ import annotations

import pytest
import torch

from marble.model import uniform_sampling as us
from marble.model.draws import CHUNK_ELEMENTS, draw_candidates, multinomial_once

CPU = torch.device("cpu")


def _probs(rows: int, positions: int, vocab: int, dtype: torch.dtype, seed: int):
    logits = torch.randn(rows, positions, vocab, generator=torch.Generator().manual_seed(seed))
    probs = (logits * 4).softmax(-1).to(dtype)
    probs[0, 1] = 0  # a one-hot position: every draw must land on it
    probs[0, 1, 3] = 1
    return probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [7, 5000, 3 * CHUNK_ELEMENTS // 40])
def test_draws_equal_torch_multinomial_and_consume_the_same_numbers(vocab, dtype):
    probs = _probs(3, 40, vocab, dtype, seed=vocab)  # the largest vocab: 3 chunks per row
    ours = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    torchs = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    drawn = draw_candidates(probs, ours)
    for b, generator in enumerate(torchs):
        assert torch.equal(drawn[b], torch.multinomial(probs[b], 1, generator=generator)[:, 0])
        assert torch.equal(ours[b].get_state(), generator.get_state())
    assert drawn[0, 1] == 3


def test_draws_from_the_global_generator_and_at_one_thread():
    probs = _probs(1, 9, 300, torch.float32, seed=0)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(5)
        ours = multinomial_once(probs, None)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.multinomial(probs, 1)[:, 0])


def test_sampled_positions_equal_their_whole_tensor_definitions():
    vocab = 2 * CHUNK_ELEMENTS // 24  # 12 positions per chunk: two per row
    scaled = torch.randn(2, 24, vocab, generator=torch.Generator().manual_seed(7)) * 6
    got = us.sampled_positions(scaled, [torch.Generator().manual_seed(s) for s in (8, 9)])
    want = [
        torch.multinomial(scaled[b].softmax(-1), 1, generator=torch.Generator().manual_seed(s))
        for b, s in enumerate((8, 9))
    ]
    assert torch.equal(got.drawn, torch.cat(want, dim=1).T)
    assert torch.equal(got.argmax, scaled.argmax(-1))
    assert torch.allclose(got.entropy, us.entropy(scaled), rtol=0, atol=1e-5)


def test_greedy_positions_equal_their_whole_tensor_definitions():
    raw = torch.randn(2, 30, 4000, generator=torch.Generator().manual_seed(3)) * 5
    got = us.greedy_positions(raw)
    confidence, best = raw.softmax(-1).max(-1)
    assert torch.equal(got.drawn, best) and torch.equal(got.confidence, confidence)
    assert torch.equal(got.argmax, raw.argmax(-1))
    assert torch.allclose(got.entropy, us.entropy(raw), rtol=0, atol=1e-5)
