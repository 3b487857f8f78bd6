"""SDAR's decoding functions on hand-made rows, several rules in one batch: k from the block
length, the three selection rules, commits only at masked positions (where upstream's top-k
would overwrite), the stop search, and the sampler against upstream's global-generator draw."""

from __future__ import annotations

import torch

from marble.families.sdar.config import Remasking
from marble.families.sdar.sampling import commit, first_stop, select
from marble.model.sampling import joint_predict, llada_counts

NEG = float("-inf")


def test_counts_come_from_the_block_length():
    block, steps = torch.tensor([4, 4, 16, 4]), torch.tensor([4, 2, 4, 8])
    per_step = [llada_counts(block, steps, torch.full((4,), i)).tolist() for i in range(8)]
    assert [row[1] for row in per_step[:2]] == [2, 2]
    assert [row[2] for row in per_step[:4]] == [4, 4, 4, 4]
    assert [row[3] for row in per_step] == [1, 1, 1, 1, 0, 0, 0, 0]  # steps > B: k = 0 steps


def test_three_rules_in_one_batch():
    conf = torch.tensor(
        [
            [0.95, 0.20, 0.60, 0.97],
            [0.95, 0.20, 0.60, 0.97],
            [0.95, 0.92, 0.60, 0.97],
            [0.95, 0.20, 0.60, 0.97],
        ]
    )
    masked = torch.tensor([[False, True, True, True]] * 3 + [[False, False, True, True]])
    k = torch.tensor([2, 2, 1, 1])
    rule = torch.tensor(
        [Remasking.STATIC, Remasking.DYNAMIC, Remasking.DYNAMIC, Remasking.SEQUENTIAL]
    )
    threshold = torch.full((4,), 0.9)
    got = select(conf, masked, k, rule, threshold)
    assert got[0].tolist() == [False, False, True, True]  # top-2 masked; pos 0 is not masked
    assert got[1].tolist() == [False, False, True, True]  # 1 above 0.9 < k = 2: top-2
    assert got[2].tolist() == [False, True, False, True]  # 2 above 0.9 >= k = 1: all of them
    assert got[3].tolist() == [False, False, True, False]  # from the first mask on


def test_threshold_is_strict():
    conf = torch.tensor([[0.9, 0.9, 0.1]])
    masked = torch.ones(1, 3, dtype=torch.bool)
    got = select(
        conf, masked, torch.tensor([1]), torch.tensor([Remasking.DYNAMIC]), torch.tensor([0.9])
    )
    assert got.sum() == 1  # neither equals-threshold passes; the top-1 fallback takes one


def test_no_overwrite_when_k_exceeds_the_masks():
    """Upstream's topk(4) over one mask also takes three -inf positions and writes x0 there."""
    block = torch.tensor([[303, 389, 198, 479]])
    x0 = torch.tensor([[378, 38, 45, 60]])
    masked = block == 479
    for rule in Remasking:
        chosen = select(
            torch.rand(1, 4), masked, torch.tensor([4]), torch.tensor([rule]), torch.tensor([0.9])
        )
        assert commit(block, x0, chosen).tolist() == [[303, 389, 198, 60]], rule.name


def test_a_row_without_masks_selects_nothing():
    masked = torch.zeros(2, 4, dtype=torch.bool)
    for rule in Remasking:
        rules = torch.full((2,), int(rule))
        assert not select(
            torch.rand(2, 4), masked, torch.tensor([1, 4]), rules, torch.zeros(2)
        ).any()


def test_first_stop():
    generated = torch.tensor([[5, 455, 7, 453], [1, 2, 3, 4], [453, 0, 0, 0]])
    assert first_stop(generated, torch.tensor([455, 453])).tolist() == [1, 4, 0]


def test_seeded_draw_is_upstreams_global_generator_draw():
    """One multinomial over [W, V] per row from a generator seeded like torch.manual_seed."""
    logits = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0)) * 3
    temperature, top_k, top_p = (
        torch.tensor([0.6, 1.0]),
        torch.tensor([20, 0]),
        torch.tensor([0.95, 1.0]),
    )
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]
    x0, p = joint_predict(logits, temperature, top_k, top_p, generators)
    for row, seed in enumerate((5, 9)):
        scaled = logits[row] / temperature[row].item()
        if top_k[row]:
            kth = scaled.topk(int(top_k[row]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, NEG)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p[row]
        drop[:, 1:] = drop[:, :-1].clone()
        drop[:, 0] = False
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), NEG)
        probs = scaled.softmax(-1)
        torch.manual_seed(seed)
        want = torch.multinomial(probs, 1).squeeze(-1)
        assert torch.equal(x0[row], want)
        torch.testing.assert_close(p[row], probs.gather(-1, want[:, None]).squeeze(-1))


def test_greedy_is_the_softmax_argmax_and_its_probability():
    logits = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(1))
    zero = torch.zeros(1)
    x0, p = joint_predict(logits, zero, torch.zeros(1, dtype=torch.long), torch.ones(1), [None])
    probs = logits.float().softmax(-1)
    assert torch.equal(x0, probs.argmax(-1))
    torch.testing.assert_close(p, probs.amax(-1))
