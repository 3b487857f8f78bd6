"""Pure sampling functions: shapes and rules on hand-made tensors."""

from __future__ import annotations

import math

import torch

from marble.model.sampling import (
    Confidence,
    dream_counts,
    dream_timesteps,
    filter_top_k_top_p,
    gumbel_argmax,
    llada_counts,
    logsumexp_,
    score_confidence,
    select_commits,
)

NAN = float("nan")


def test_threshold_rule_commits_top1_plus_confident():
    conf = torch.tensor([[0.2, 0.95, 0.5, 0.91], [0.1, 0.3, 0.2, 0.0]])
    eligible = torch.tensor([[True, True, True, True], [True, True, False, True]])
    commit = select_commits(conf, eligible, torch.tensor([0, 0]), torch.tensor([0.9, 0.9]))
    assert commit.tolist() == [[False, True, False, True], [False, True, False, False]]


def test_count_rule_takes_top_k_eligible_only():
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    eligible = torch.tensor([[False, True, True, True]])
    commit = select_commits(conf, eligible, torch.tensor([2]), torch.tensor([NAN]))
    assert commit.tolist() == [[False, True, True, False]]


def test_llada_counts_spread_remainder_first():
    m, s = torch.tensor([10, 10, 10]), torch.tensor([4, 4, 4])
    counts = [llada_counts(m, s, torch.full((3,), i))[0].item() for i in range(4)]
    assert counts == [3, 3, 2, 2] and sum(counts) == 10


def test_dream_schedule_matches_reference_shape():
    t = dream_timesteps(16)
    n, committed = 32, []
    for i in range(16):
        k = dream_counts(
            torch.tensor([n]),
            torch.tensor([t[i]]),
            torch.tensor([t[i + 1]]),
            torch.tensor([i == 15]),
        )[0].item()
        committed.append(k)
        n -= k
    assert committed[0] == 1 and committed[-1] == 3 and sum(committed) == 32 and n == 0


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    k2 = filter_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isinf(k2[0, 0, 2:]).all() and torch.isfinite(k2[0, 0, :2]).all()
    p7 = filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(p7[0, 0, :2]).all() and torch.isinf(p7[0, 0, 2:]).all()


def test_gumbel_temperature_zero_is_argmax_and_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 4000, 3).contiguous()
    g = torch.Generator().manual_seed(0)
    u = torch.rand((1, 4000, 3), generator=g, dtype=torch.float64)
    greedy = gumbel_argmax(logits, torch.tensor([0.0]), u)
    assert (greedy == 0).all()
    sampled = gumbel_argmax(logits, torch.tensor([1.0]), u)
    freq = torch.bincount(sampled.flatten(), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_confidence_kinds():
    p = torch.tensor([[[0.6, 0.3, 0.1]]])
    logits = p.log()
    x0 = torch.tensor([[0]])
    for kind, expected in [
        (Confidence.PROBABILITY, 0.6),
        (Confidence.MARGIN, 0.3),
        (Confidence.ENTROPY, sum(q * math.log(q + 1e-10) for q in (0.6, 0.3, 0.1))),
    ]:
        conf, logprob = score_confidence(logits.clone(), x0, torch.tensor([int(kind)]), None)
        assert abs(conf.item() - expected) < 1e-5
        assert abs(logprob.item() - math.log(0.6)) < 1e-5
    conf, _ = score_confidence(
        logits.clone(), x0, torch.tensor([int(Confidence.RANDOM)]), torch.tensor([[0.123]])
    )
    assert abs(conf.item() - 0.123) < 1e-6


def test_logsumexp_in_place_equals_torch():
    x = torch.randn(8, 5000) * 4
    x[1] = float("-inf")
    x[2, 7] = float("inf")
    expected = torch.logsumexp(x, -1)
    assert torch.equal(logsumexp_(x.clone()), expected)
