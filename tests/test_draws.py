"""`marble.model.draws`: the categorical draws equal `torch.multinomial(p, 1)`'s token for
token, and leave the generator where torch leaves it, at every chunking and dtype; the
chunked vocabulary passes of `uniform_sampling` equal their whole-tensor definitions, and
give every torch thread a position; `argmax` is torch's; and rows with generators of their
own make those passes two at a time, to the same numbers."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from marble.model import uniform_sampling as us
from marble.model.draws import (
    CHUNK_ELEMENTS,
    argmax,
    draw_candidates,
    each_row,
    multinomial_once,
    position_chunks,
)

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


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


def test_rows_with_their_own_generators_run_two_at_a_time(two_threads):
    meet = threading.Barrier(2, timeout=10)  # breaks unless two rows are in flight together
    seen: dict[int, int] = {}

    def work(b: int) -> None:
        seen[b] = threading.get_ident()
        meet.wait()

    each_row([torch.Generator() for _ in range(4)], CPU, work)
    assert sorted(seen) == [0, 1, 2, 3] and threading.get_ident() not in seen.values()


@pytest.mark.parametrize("shared", ["one generator", "global", "one thread"])
def test_rows_that_share_a_generator_or_a_thread_run_in_order_here(shared, two_threads):
    generator = torch.Generator()
    generators = {
        "one generator": [generator, torch.Generator(), generator],
        "global": [torch.Generator(), None, torch.Generator()],
        "one thread": [torch.Generator() for _ in range(3)],
    }[shared]
    if shared == "one thread":
        torch.set_num_threads(1)
    order: list[tuple[int, int]] = []
    each_row(generators, CPU, lambda b: order.append((b, threading.get_ident())))
    assert order == [(b, threading.get_ident()) for b in range(3)]


def test_rows_write_the_callers_inference_tensors_and_all_finish_before_an_error(two_threads):
    finished = threading.Event()

    def work(b: int) -> None:
        out[b] = b  # an in-place write to an inference tensor: only under inference mode
        if b == 0:
            raise ValueError("row 0")
        time.sleep(0.2)
        finished.set()

    with torch.inference_mode():
        out = torch.zeros(2)
        with pytest.raises(ValueError, match="row 0"):
            each_row([torch.Generator(), torch.Generator()], CPU, work)
    assert finished.is_set() and out.tolist() == [0.0, 1.0]


def test_a_forked_child_runs_rows_on_threads_of_its_own(two_threads):
    def rows() -> set[int]:
        seen: set[int] = set()
        meet = threading.Barrier(2, timeout=10)
        each_row([torch.Generator(), torch.Generator()], CPU, lambda b: seen.add(meet.wait()))
        return seen

    assert rows() == {0, 1}  # the parent's pool exists before the fork
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status only
        os._exit(0 if rows() == {0, 1} else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, 9)
        os.waitpid(child, 0)
    assert done[0] == child and os.waitstatus_to_exitcode(done[1]) == 0


def test_two_rows_at_a_time_draw_what_one_row_at_a_time_does(two_threads):
    vocab = 2 * CHUNK_ELEMENTS // 24  # two chunks per row
    scaled = torch.randn(5, 24, vocab, generator=torch.Generator().manual_seed(4)) * 6
    seeds = (21, 22, 23, 24, 25)
    got = us.sampled_positions(scaled, [torch.Generator().manual_seed(s) for s in seeds])
    drawn = draw_candidates(scaled.softmax(-1), [torch.Generator().manual_seed(s) for s in seeds])
    for b, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        want = torch.multinomial(scaled[b].softmax(-1), 1, generator=generator)[:, 0]
        assert torch.equal(got.drawn[b], want) and torch.equal(drawn[b], want)
    assert torch.equal(got.argmax, scaled.argmax(-1))
    assert torch.allclose(got.entropy, us.entropy(scaled), rtol=0, atol=1e-5)


def test_argmax_equals_torch_argmax_with_ties_remainders_and_nan():
    g = torch.Generator().manual_seed(0)
    for vocab in (5, 128, 300, 1000):
        ties = torch.randint(0, 3, (64, vocab), generator=g).float()
        assert torch.equal(argmax(ties, group=7), ties.argmax(-1))
        assert torch.equal(argmax(ties), ties.argmax(-1))
    x = torch.randn(4, 2, 1000, generator=g)
    x[0, 1, 3] = float("nan")
    x[2, 0, 997] = float("nan")
    assert torch.equal(argmax(x, group=16), x.argmax(-1))


def test_a_pass_gives_every_torch_thread_a_position(two_threads):
    """torch splits a row-wise op (softmax, argmax) by rows: a chunk of one position per
    vocabulary row would run on one thread however large that row is."""
    for vocab in (1000, CHUNK_ELEMENTS, 4 * CHUNK_ELEMENTS):
        chunks = position_chunks(9, vocab, CPU)
        assert [p.start for p in chunks] == list(range(0, 9, chunks[0].stop))
        assert all(p.stop - p.start >= 2 for p in chunks)
        assert chunks[0].stop * vocab <= max(CHUNK_ELEMENTS, 2 * vocab)
