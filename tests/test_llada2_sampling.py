"""LLaDA2.1's joint unmask/edit rule and post-fill bookkeeping on hand-made tensors."""

from __future__ import annotations

import torch

from marble.model.sampling import block_settled, joint_predict, joint_select, post_step_gate

M = -1  # stands for the mask id in these blocks


def _select(x0, p, block, protected, threshold, editing, count):
    block = torch.tensor(block)
    return joint_select(
        torch.tensor(x0),
        torch.tensor(p),
        block,
        block == M,
        torch.tensor(protected),
        torch.tensor(threshold),
        torch.tensor(editing),
        torch.tensor(count),
    )


def test_unmask_above_threshold_strictly_else_top_k_fallback():
    step = _select(
        x0=[[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]],
        p=[[0.9, 0.5, 0.95, 0.97], [0.9, 0.5, 0.95, 0.2], [0.3, 0.6, 0.1, 0.9]],
        block=[[M, M, M, M], [M, M, M, M], [M, M, M, 4]],
        protected=[[False] * 4] * 3,
        threshold=[0.9, 0.9, 0.9],
        editing=[2.0, 2.0, 2.0],
        count=[2, 2, 2],
    )
    # Row 0: two pass (0.9 does not: strict >), so both and only they; row 1: one passes,
    # fewer than 2, so the top 2 by p; row 2: none pass, top 2 among the masked only.
    assert step.commit.tolist() == [
        [False, False, True, True],
        [True, False, True, False],
        [True, True, False, False],
    ]
    assert not step.edit.any()
    assert step.tokens.tolist() == [[M, M, 7, 8], [5, M, 7, M], [5, 6, M, 4]]


def test_fallback_never_exceeds_the_masks_left():
    step = _select([[5, 6, 7]], [[0.1, 0.2, 0.3]], [[1, M, 2]], [[False] * 3], [0.9], [2.0], [4])
    assert step.commit.tolist() == [[False, True, False]]


def test_edits_replace_filled_unprotected_changed_confident_tokens():
    step = _select(
        x0=[[9, 9, 9, 9, 9, 9]],
        p=[[1.0, 0.8, 0.8, 0.4, 0.8, 0.99]],
        block=[[3, 3, 9, 3, M, 3]],
        protected=[[True, False, False, False, False, False]],
        threshold=[0.9],
        editing=[0.5],
        count=[1],
    )
    # The prompt (0) is never edited; 2 already holds x0; 3 is not confident enough; the
    # mask (4) is committed by the fallback, not edited; 1 and 5 are edited in the same step.
    assert step.edit.tolist() == [[False, True, False, False, False, True]]
    assert step.commit.tolist() == [[False, False, False, False, True, False]]
    assert step.tokens.tolist() == [[3, 9, 9, 3, 9, 9]]


def test_each_row_reads_its_own_thresholds():
    step = _select(
        [[5, 5], [5, 5]],
        [[0.6, 0.6], [0.6, 0.6]],
        [[M, 1], [M, 1]],
        [[False] * 2] * 2,
        [0.5, 0.7],
        [0.5, 0.7],
        [1, 1],
    )
    assert step.commit.tolist() == [[True, False], [True, False]]  # row 1 by the fallback
    assert step.edit.tolist() == [[False, True], [False, False]]


def test_post_steps_count_mask_free_blocks_and_end_past_the_budget():
    active = torch.tensor([[True, False], [False, False], [False, False]])
    post, over = post_step_gate(active, torch.tensor([0, 0, 2]), torch.tensor([16, 0, 2]))
    assert post.tolist() == [0, 1, 3] and over.tolist() == [False, True, True]
    edit = torch.tensor([[False, False], [True, False], [False, False]])
    assert block_settled(active, edit).tolist() == [False, False, True]


def test_predict_greedy_rows_take_the_argmax_and_its_probability():
    logits = torch.tensor([[[0.0, 2.0, 1.0]], [[3.0, 0.0, 0.0]]])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    x0, p = joint_predict(
        logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), gens
    )
    assert x0.tolist() == [[1], [0]]  # row 1 samples with top-k 1: only the argmax remains
    assert torch.allclose(p[0], logits[0].softmax(-1)[:, 1]) and p[1].item() == 1.0


def test_predict_sampled_rows_follow_their_generator():
    logits = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(0))
    args = (logits, torch.tensor([0.8, 0.8]), torch.tensor([0, 10]), torch.tensor([0.9, 1.0]))

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return joint_predict(*args, [torch.Generator().manual_seed(seed) for _ in range(2)])

    (a, pa), (b, pb), (c, _) = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and torch.equal(pa, pb) and not torch.equal(a, c)
    # Row 1 keeps its top 10: every draw is among them, with its renormalised probability.
    top = logits[1].topk(10, dim=-1)
    assert (a[1][:, None] == top.indices).any(-1).all()
    filtered = (top.values / 0.8).softmax(-1)
    expected = filtered[(a[1][:, None] == top.indices)].view(-1)
    assert torch.allclose(pa[1], expected)
