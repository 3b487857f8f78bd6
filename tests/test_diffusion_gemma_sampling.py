"""Properties of the uniform-state sampler functions (`marble.model.uniform_sampling`).

No model: hand-made entropies, logits and canvases. Rows are independent (batched == alone),
rank 0 is always accepted, block-refinement commits are cumulative and sticky, EOS handling
pads after the first EOS and whole canvases of finished rows.
"""

from __future__ import annotations

import math

import torch

from marble.model import uniform_sampling as us
from marble.model.draws import draw_candidates


def test_temperature_schedule_runs_from_t_max_down():
    steps = torch.full((8,), 8)
    t = us.temperature_schedule(
        torch.arange(8, 0, -1),
        steps,
        torch.full((8,), 0.4, dtype=torch.float64),
        torch.full((8,), 0.8, dtype=torch.float64),
    )
    assert t.dtype == torch.float32
    assert float(t[0]) == float(torch.tensor(0.8, dtype=torch.float32))
    assert float(t[-1]) == float(torch.tensor(0.4) + torch.tensor(0.4) * (1 / 8))
    assert bool((t[1:] < t[:-1]).all())


def test_entropy_bound_accepts_prefix_of_sorted_entropies():
    h = torch.tensor([[0.5, 0.01, 0.02, 0.2, 0.03], [2.0, 3.0, 1.0, 4.0, 5.0]])
    accepted = us.entropy_bound_accept(h, torch.tensor([0.1, 0.1]))
    # Row 0: sorted 0.01, 0.02, 0.03, 0.2, 0.5; sums before: 0, .01, .03, .06, .26.
    assert accepted[0].tolist() == [False, True, True, True, True]
    # Row 1: only rank 0 (entropy 1.0), even though it alone exceeds the bound.
    assert accepted[1].tolist() == [False, False, True, False, False]
    alone = us.entropy_bound_accept(h[1:], torch.tensor([0.1]))
    assert torch.equal(alone[0], accepted[1])
    zero = us.entropy_bound_accept(h, torch.zeros(2))
    assert zero.sum(-1).tolist() == [1, 1]


def test_entropy_bound_step_is_not_sticky():
    scaled = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    candidates = scaled.argmax(-1)
    noise = torch.full((2, 6), 10)
    step = us.entropy_bound_step(us.entropy(scaled), candidates, noise, torch.tensor([0.0, 1e9]))
    assert step.accepted.sum(-1).tolist() == [1, 6]
    assert torch.equal(step.canvas[step.accepted], candidates[step.accepted])
    assert bool((step.canvas[~step.accepted] == 10).all())


def test_stop_rule_needs_history_and_confidence():
    argmax = torch.tensor([[1, 2], [3, 4]])
    low = torch.full((2, 2), 1e-4)
    history = us.initial_history(1, 2, 2, torch.device("cpu"))
    fired, stable, _, history = us.stable_and_confident(
        argmax, low, history, torch.full((2,), 5e-3)
    )
    assert not bool(stable.any()) and not bool(fired.any())
    high = torch.tensor([[1e-4, 1e-4], [1.0, 1.0]])
    fired, stable, confident, _ = us.stable_and_confident(
        argmax, high, history, torch.full((2,), 5e-3)
    )
    assert stable.tolist() == [True, True] and confident.tolist() == [True, False]
    assert fired.tolist() == [True, False]
    none = us.initial_history(0, 2, 2, torch.device("cpu"))
    assert us.stable_and_confident(argmax, low, none, torch.full((2,), 5e-3))[1].all()


def test_finalize_canvas_pads_after_first_eos_and_finished_rows():
    eos = torch.tensor([1, 106, 50])
    canvas = torch.tensor([[7, 50, 8, 1], [7, 8, 9, 10], [1, 2, 3, 4]])
    finished = torch.tensor([False, False, True])
    out, done = us.finalize_canvas(canvas, finished, eos, 0)
    assert out.tolist() == [[7, 50, 0, 0], [7, 8, 9, 10], [0, 0, 0, 0]]
    assert done.tolist() == [True, False, True]


def test_block_refinement_commits_are_cumulative_and_sticky():
    steps, length = 4, 10
    gen = torch.Generator().manual_seed(1)
    canvas = torch.randint(0, 20, (1, length), generator=gen)
    committed = torch.zeros(1, length, dtype=torch.bool)
    held: dict[int, int] = {}
    for k in range(steps):
        raw = torch.randn(1, length, 20, generator=gen)
        noise = torch.randint(0, 20, (1, length), generator=gen)
        greedy = us.greedy_positions(raw)
        step = us.block_refinement_step(
            greedy.confidence,
            greedy.drawn,
            canvas,
            committed,
            noise,
            torch.tensor([k]),
            torch.tensor([steps]),
            torch.tensor([2.0]),
        )
        assert int(step.committed.sum()) == math.ceil((k + 1) * length / steps)
        for pos, token in held.items():  # earlier commits keep their token
            assert int(step.canvas[0, pos]) == token
        for pos in step.commits[0].nonzero().flatten().tolist():
            held[pos] = int(step.argmax[0, pos])
        canvas, committed = step.canvas, step.committed
    assert bool(committed.all())


def test_block_refinement_threshold_adds_confident_positions():
    confidence = torch.tensor([[0.99, 0.2, 0.97, 0.3]])
    commits = us.block_refinement_commit(
        confidence,
        torch.zeros(1, 4, dtype=torch.bool),
        torch.tensor([0]),
        torch.tensor([4]),
        torch.tensor([0.95]),
    )
    assert commits.tolist() == [[True, False, True, False]]


def test_per_row_generators_make_batched_draws_equal_alone():
    probs = torch.softmax(torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3)), -1)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    both = draw_candidates(probs, gens)
    alone = draw_candidates(probs[1:], [torch.Generator().manual_seed(12)])
    assert torch.equal(both[1:], alone)
    noise = us.draw_uniform([torch.Generator().manual_seed(5), None], 5, 7, torch.device("cpu"))
    assert noise.shape == (2, 5)
    assert torch.equal(
        noise[0], torch.randint(0, 7, (1, 5), generator=torch.Generator().manual_seed(5))[0]
    )


def test_tokens_per_forward_counts_non_pad():
    generated = torch.tensor([[5, 0, 6, 0], [1, 2, 3, 4]])
    assert us.tokens_per_forward(generated, torch.tensor([4, 2]), 0).tolist() == [0.5, 2.0]
